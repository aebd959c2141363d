"""The engine in a child process.

A managed save runs the engine in a child so that the controlling process
outlives it: if the child dies, QEMU's migration fails and the controller
resumes the guest. The child dies with its parent (PR_SET_PDEATHSIG), so an
orphaned save never completes behind a controller that is gone.

Protocol: argv[1] is a JSON job; stdout carries JSON lines, {"progress": stats}
while running and one final {"ok": true, "stats": ...} or {"ok": false, ...}.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from . import engine, errors

__all__ = ["EngineProcess"]

_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls for cls in (
        errors.ImageCorrupt, errors.ImageTruncated, errors.UnsupportedImageVersion,
        errors.NotAnImage, errors.Cancelled, errors.FastsaveError, ValueError, MemoryError,
    )
}


class EngineProcess:
    """Parent side: start, watch, kill and collect one engine child."""

    def __init__(self, job: dict[str, Any], fd: int,
                 progress: Callable[[engine.Stats], None] | None = None,
                 keep_fds: tuple[int, ...] = ()) -> None:
        job = dict(job, fd=fd, parent=os.getpid())
        self._progress = progress
        self._final: dict[str, Any] | None = None
        self.last: engine.Stats | None = None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastsave.worker", json.dumps(job)],
            pass_fds=[fd, *keep_fds], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, close_fds=True,
        )
        self._reader = threading.Thread(target=self._read, name="fastsave-worker-out", daemon=True)
        self._reader.start()

    @classmethod
    def save(cls, in_fd: int, path: str, progress: Callable[[engine.Stats], None] | None = None,
             **kw: Any) -> EngineProcess:
        return cls({"op": "save", "path": path, "kw": kw}, in_fd, progress)

    @classmethod
    def restore(cls, image_fd: int, out_fd: int,
                progress: Callable[[engine.Stats], None] | None = None, **kw: Any) -> EngineProcess:
        """The child reads the very file the parent opened and checked."""
        return cls({"op": "restore", "path": f"/proc/self/fd/{image_fd}", "kw": kw}, out_fd,
                   progress, keep_fds=(image_fd,))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "progress" in msg:
                self.last = engine.Stats(**msg["progress"])
                if self._progress is not None:
                    self._progress(self.last)
            else:
                self._final = msg

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.running():
            self.proc.kill()

    def result(self, timeout: float | None = None) -> engine.Stats:
        """Waits for the child; returns its stats or raises what it raised."""
        self.proc.wait(timeout)
        self._reader.join()
        msg = self._final
        if msg is None:
            sig = -self.proc.returncode if self.proc.returncode < 0 else 0
            why = f"killed by signal {signal.Signals(sig).name}" if sig else \
                f"exited with status {self.proc.returncode}"
            raise errors.FastsaveError(f"the engine process {why} before finishing")
        if msg.get("ok"):
            return engine.Stats(**msg["stats"])
        kind, text = msg.get("type", "FastsaveError"), msg.get("message", "engine failed")
        if msg.get("errno"):
            raise OSError(msg["errno"], text, msg.get("filename"))
        cls = _ERRORS.get(kind, errors.FastsaveError)
        raise cls(text)


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def _emit(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def main() -> int:
    job = json.loads(sys.argv[1])
    _die_with_parent(job["parent"])
    kw = dict(job.get("kw", {}))
    kw["progress"] = lambda s: _emit({"progress": dataclasses.asdict(s)})
    kw.setdefault("progress_interval", 0.25)
    try:
        if job["op"] == "save":
            stats = engine.save_stream(job["fd"], job["path"], **kw)
        else:
            stats = engine.restore_stream(job["path"], job["fd"], **kw)
    except OSError as e:
        _emit({"ok": False, "type": type(e).__name__, "errno": e.errno,
               "message": e.strerror or str(e), "filename": e.filename})
        return 1
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        _emit({"ok": False, "type": type(e).__name__, "message": str(e)})
        return 1
    _emit({"ok": True, "stats": dataclasses.asdict(stats)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
