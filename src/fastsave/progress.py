"""Live progress of bulk operations: a redrawn table on a terminal, plain
lines (one per finished domain) anywhere else; and of one domain's save,
as virsh shows it (JobProgress)."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from .hostwide import DomainResult

__all__ = ["ProgressView", "JobProgress"]


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


class ProgressView:
    def __init__(self, verb: str, stream: TextIO | None = None, interval: float = 0.2) -> None:
        self.verb = verb
        self.out = stream or sys.stdout
        self.tty = self.out.isatty()
        self.interval = interval
        self.results: list[DomainResult] = []
        self._done: set[str] = set()
        self._lines = 0
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, results: list[DomainResult]) -> None:
        self.results = results
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="fastsave-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._tick(final=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._tick(final=False)

    def _moved(self, r: DomainResult) -> int:
        s = r.progress
        return 0 if s is None else max(s.bytes_in if self.verb == "save" else s.bytes_out, 0)

    def _tick(self, final: bool) -> None:
        if not self.tty:
            for r in self.results:
                if r.uuid not in self._done and (r.ok or r.error or r.action):
                    self._done.add(r.uuid)
                    what = r.action or ("ok" if r.ok else "FAILED")
                    tail = f" in {r.seconds:.1f} s, {_mb(r.bytes)}" if r.ok else f": {r.error}"
                    self.out.write(f"{r.name}: {what}{tail}\n")
            self.out.flush()
            return
        width = shutil.get_terminal_size((100, 20)).columns
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        lines = []
        total = done_b = 0
        for r in self.results:
            moved = self._moved(r)
            expect = max(r.expected_bytes, moved, 1)
            total += expect
            done_b += expect if (r.ok or r.error) else moved
            frac = 1.0 if r.ok else min(moved / expect, 0.99)
            state = "done" if r.ok else ("FAILED" if r.error else ("waiting" if not moved else ""))
            bar = "#" * int(frac * 20)
            rate = moved / 1e6 / (r.progress.wall if r.progress and r.progress.wall else elapsed)
            lines.append(f"{r.name[:24]:24} [{bar:20}] {_mb(moved):>10} {rate:7.0f} MB/s {state}")
        rate = done_b / elapsed
        eta = (total - done_b) / rate if rate > 0 and not final else 0.0
        lines.append(f"{'total':24} {_mb(done_b):>33} {rate / 1e6:7.0f} MB/s  ETA {eta:5.1f} s")
        text = "".join(ln[:width - 1] + "\x1b[K\n" for ln in lines)
        up = f"\x1b[{self._lines}F" if self._lines else ""
        self.out.write(up + text)
        self.out.flush()
        self._lines = len(lines)


class JobProgress:
    """One domain's save as `virsh save --verbose` shows it: `LABEL: [45.00 %]`
    redrawn on stderr (a terminal), or a line per whole percent elsewhere;
    100 % only once the job is done. `percent()` supplies the figure (None:
    not known yet); a failing one is ignored."""

    def __init__(self, label: str, percent: Callable[[], float | None],
                 stream: TextIO | None = None, interval: float = 0.25) -> None:
        self.label = label
        self.percent = percent
        self.out = stream or sys.stderr
        self.tty = self.out.isatty()
        self.interval = interval
        self._last = -1.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fastsave-job-progress", daemon=True)

    def __enter__(self) -> JobProgress:
        self._thread.start()
        return self

    def __exit__(self, t: type[BaseException] | None, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        if t is None:
            self._show(100.0)
        if self._last >= 0 and self.tty:
            self.out.write("\n")
            self.out.flush()

    def _loop(self) -> None:
        while True:  # a first figure at once, then one per interval
            try:
                p = self.percent()
            except Exception:  # noqa: BLE001 - progress is never worth a failure
                p = None
            if p is not None:
                self._show(min(max(p, 0.0), 99.99))
            if self._stop.wait(self.interval):
                return

    def _show(self, p: float) -> None:
        p = int(p * 100) / 100.0  # two decimals, never rounded up to 100
        if self.tty:
            if p != self._last:
                self.out.write(f"\r{self.label}: [{p:5.2f} %]")
        elif int(p) != int(self._last):
            self.out.write(f"{self.label}: [{p:5.2f} %]\n")
        self._last = p
        self.out.flush()
