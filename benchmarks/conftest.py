"""Benchmark harness: a producer process pipes a guest-like stream into a consumer.

Each round starts a producer (`producer.py`, which holds the stream in memory)
and the consumer under test reading the producer's pipe; the timed part runs
from "go" until the consumer has exited with its output durable on disk. The
output file is removed between rounds. Peak RSS comes from GNU time.

Environment: FASTSAVE_BENCH_SIZE_MIB (stream size, default 1024),
FASTSAVE_BENCH_ROUNDS (default 3), FASTSAVE_BENCH_DIR (cache and output
directory, default /var/tmp/fastsave-bench).
"""
from __future__ import annotations

import fcntl
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from testkit.mixed import write_mixed_file  # on pytest's pythonpath (pyproject)

HERE = Path(__file__).resolve().parent

MIB = 1 << 20
SIZE = int(os.environ.get("FASTSAVE_BENCH_SIZE_MIB", "1024")) * MIB
ROUNDS = int(os.environ.get("FASTSAVE_BENCH_ROUNDS", "3"))
BENCH_DIR = Path(os.environ.get("FASTSAVE_BENCH_DIR", "/var/tmp/fastsave-bench"))
SEED = 0
PIPE_SIZE = 1 << 20  # every consumer reads the same 1 MiB pipe
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
TIMEOUT = 900

# Shell contenders; "$0" is the output file. Each makes its output durable.
COMMANDS = {
    "cat": ["sh", "-c", 'cat > "$0" && sync "$0"'],
    "dd": ["dd", "of={out}", "bs=1M", "conv=fdatasync", "status=none"],
    "dd-direct": ["dd", "of={out}", "bs=1M", "oflag=direct", "iflag=fullblock",
                  "conv=fdatasync", "status=none"],
    "zstd-T2": ["sh", "-c", 'zstd -q -f -1 -T2 -o "$0" && sync "$0"'],
    "zstd-T1": ["sh", "-c", 'zstd -q -f -1 -T1 -o "$0" && sync "$0"'],
}
FASTSAVE_STATS = ("wall", "producer_blocked", "input_wait", "output_wait", "reader_cpu",
                  "writer_cpu", "worker_cpu", "chunks_compressed", "chunks_stored")

(HERE / "results").mkdir(exist_ok=True)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Benchmarks run only when benchmarks/ (or a file in it) is named explicitly."""
    base = config.invocation_params.dir
    for arg in config.invocation_params.args:
        p = (base / str(arg).split("::")[0]).resolve()
        if p.exists() and (p == HERE or HERE in p.parents):
            return None
    return True


def contender_argv(name: str, out: Path) -> list[str]:
    """fastsave-MODE[-direct] runs fastsave_consumer.py; the rest are COMMANDS."""
    if name.startswith("fastsave-"):
        _, mode, *direct = name.split("-")
        return [sys.executable, str(HERE / "fastsave_consumer.py"), str(out), mode, *direct]
    argv = [a.format(out=out) for a in COMMANDS[name]]
    return argv + [str(out)] if argv[0] == "sh" else argv


class Round:
    """One producer -> pipe -> consumer run. Spawning waits until both are ready."""

    def __init__(self, stream: Path, size: int, rate: float, contender: str, out: Path):
        self.out, self.rss_file = out, out.with_name(out.name + ".rss")
        self.is_fastsave = contender.startswith("fastsave-")
        r, w = os.pipe()
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.ctl, theirs = socket.socketpair()
        self.producer = subprocess.Popen(
            [sys.executable, str(HERE / "producer.py"), str(stream), str(size), str(rate),
             str(theirs.fileno())], stdout=w, pass_fds=(theirs.fileno(),))
        os.close(w)
        theirs.close()
        if self.ctl.recv(1) != b"R":
            self.producer.kill()
            self.producer.wait()
            os.close(r)
            raise RuntimeError("the producer did not start")
        # Started only now, so fastsave's Stats (wall, input_wait) hold no set-up time.
        argv = contender_argv(contender, out)
        if GNU_TIME:
            argv = [GNU_TIME, "-f", "%M", "-o", str(self.rss_file), *argv]
        self.consumer = subprocess.Popen(
            argv, stdin=r, stdout=subprocess.PIPE if self.is_fastsave else subprocess.DEVNULL)
        os.close(r)
        if self.is_fastsave:
            assert self.consumer.stdout is not None
            if self.consumer.stdout.readline() != b"ready\n":
                self.kill()
                raise RuntimeError("the fastsave consumer did not start")
        else:
            time.sleep(0.2)  # let exec and start-up of the tool finish

    def go(self) -> float:
        """The timed part: stream everything, wait for the consumer to finish."""
        busy0, ours0 = _busy_cpu(), _children_cpu() + _tree_cpu()
        watchdog = threading.Timer(TIMEOUT, self.kill)
        watchdog.start()
        t0 = time.perf_counter()
        self.ctl.sendall(b"G")
        # No timeout here: Popen.wait(timeout) polls with sleeps of up to 50 ms.
        rc = self.consumer.wait()
        elapsed = time.perf_counter() - t0
        self.producer.wait()
        watchdog.cancel()
        # CPU the whole machine used beyond producer + consumer: other work, kernel threads.
        self.other_cpu = max(0.0, (_busy_cpu() - busy0) - (_children_cpu() - ours0))
        if rc != 0 or self.producer.returncode != 0:
            raise RuntimeError(f"consumer exit {rc}, producer exit {self.producer.returncode}")
        return elapsed

    def finish(self, elapsed: float) -> dict[str, Any]:
        res: dict[str, Any] = {"seconds": elapsed, "out_bytes": self.out.stat().st_size,
                               "producer_seconds": float(self.ctl.recv(64) or "nan"),
                               "other_cpu": self.other_cpu}
        self.ctl.close()
        if GNU_TIME:
            res["peak_rss_kib"] = int(self.rss_file.read_text().split()[-1])
            self.rss_file.unlink()
        if self.is_fastsave:
            assert self.consumer.stdout is not None
            res["stats"] = json.loads(self.consumer.stdout.read())
            res.setdefault("peak_rss_kib", res["stats"]["vmhwm_kib"])
        return res

    def kill(self) -> None:
        for p in (self.consumer, self.producer):
            if p.poll() is None:
                p.kill()
                p.wait()


def _busy_cpu() -> float:
    """Seconds of CPU all cores have spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait


def _children_cpu() -> float:
    """CPU seconds of our children that have been waited for."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _tree_cpu() -> float:
    """CPU seconds used so far by our live descendants (and what they reaped)."""
    parent, cpu = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parent[int(d)] = int(fields[1])
        cpu[int(d)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    me, total = os.getpid(), 0
    for pid in cpu:
        p = parent[pid]
        while p > 1 and p != me:
            p = parent.get(p, 0)
        total += cpu[pid] if p == me else 0
    return total / os.sysconf("SC_CLK_TCK")


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def summarize(rounds: list[dict[str, Any]], size: int) -> dict[str, Any]:
    med = statistics.median
    seconds = med(r["seconds"] for r in rounds)
    out_bytes = med(r["out_bytes"] for r in rounds)
    info: dict[str, Any] = {
        "stream_bytes": size,
        "rounds": len(rounds),
        "seconds": [round(r["seconds"], 4) for r in rounds],
        "out_bytes": out_bytes,
        "size_ratio": out_bytes / size,
        "mb_per_s": size / seconds / 1e6,
        "producer_seconds": med(r["producer_seconds"] for r in rounds),
        # after the producer's last write: draining the pipe, flushing, fsync
        "tail_seconds": med(r["seconds"] - r["producer_seconds"] for r in rounds),
        "other_cpu_seconds": med(r["other_cpu"] for r in rounds),
        "peak_rss_kib": max(r.get("peak_rss_kib", 0) for r in rounds) or None,
    }
    if "stats" in rounds[0]:
        for key in FASTSAVE_STATS:
            info[key] = med(r["stats"][key] for r in rounds)
        info["direct"] = rounds[0]["stats"]["direct"]
        info["spliced"] = rounds[0]["stats"]["spliced"]
        info["vmhwm_kib"] = max(r["stats"]["vmhwm_kib"] for r in rounds)
    return info


@pytest.fixture(scope="session")
def stream_file() -> Path:
    """The benchmark stream (mixed guest-like data), written once and kept."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / f"mixed-seed{SEED}-{SIZE // MIB}MiB.bin"
    if not path.exists() or path.stat().st_size != SIZE:
        tmp = path.with_name(path.name + ".tmp")
        write_mixed_file(tmp, SIZE, seed=SEED)
        tmp.rename(path)
    return path


@pytest.fixture(scope="session")
def stream_size() -> int:
    return SIZE


@pytest.fixture
def save_bench(stream_file: Path) -> Callable[..., dict[str, Any]]:
    """run(benchmark, contender, rate, size=SIZE, rounds=ROUNDS) -> extra_info."""
    out_dir = BENCH_DIR / "out"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / "image"

    def run(benchmark: Any, contender: str, rate: float, size: int = SIZE,
            rounds: int = ROUNDS) -> dict[str, Any]:
        done: list[dict[str, Any]] = []
        live: list[Round] = []
        times: list[float] = []

        def setup() -> None:
            if live:
                done.append(live.pop().finish(times[-1]))
            _remove(out)
            os.sync()  # nothing dirty from before may be flushed inside the round
            live.append(Round(stream_file, size, rate, contender, out))

        try:
            benchmark.pedantic(lambda: times.append(live[-1].go()), setup=setup,
                               rounds=rounds, iterations=1, warmup_rounds=0)
            done.append(live.pop().finish(times[-1]))
        finally:
            for r in live:
                r.kill()
            _remove(out)
        info = {"contender": contender, "rate_bytes_per_s": rate, **summarize(done, size)}
        benchmark.extra_info.update(info)
        return info

    return run
