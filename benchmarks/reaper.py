"""Prompt reaping of exited QEMU processes for benchmark runs.

usage: python -m benchmarks.reaper COMMAND [ARG...]
(or by its path: it imports nothing of the project)

libvirt stops a domain by signalling QEMU and polling until its pid is gone.
QEMU is a daemon, so its zombie is reaped by the nearest subreaper, normally
the host's init, which does it at once. On machines whose pid 1 reaps orphans
only now and then (measured: every ~1.8 s on the sandboxed VMs these
benchmarks were developed on) every stop, libvirt's and fastsave's alike,
would carry that delay. So a benchmark agent (which runs the embedded driver,
and so starts QEMU) runs under this shim: it makes itself the subreaper, runs
COMMAND as its child and reaps every orphan that lands on it at once, as a
host's init does. COMMAND's own children stay COMMAND's to wait for.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

__all__ = ["orphan_reap_delay", "wrap"]

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1


def wrap(argv: list[str]) -> list[str]:
    """argv run under the shim."""
    return [sys.executable, os.path.abspath(__file__), *argv]


def orphan_reap_delay(tries: int = 3) -> float:
    """Median time (s) this machine takes to reap an orphan whose parent is
    not a subreaper: what every QEMU stop waits for without the shim."""
    delays = []
    for _ in range(tries):
        sh = subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
                            capture_output=True, text=True, check=True)
        pid = int(sh.stdout)
        time.sleep(0.05)
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        while os.path.exists(f"/proc/{pid}") and time.perf_counter() - t0 < 10:
            time.sleep(0.002)
        delays.append(time.perf_counter() - t0)
    return sorted(delays)[len(delays) // 2]


def main(argv: list[str]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    child = os.fork()
    if child == 0:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # dies with the shim
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: os.kill(child, s))
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 1
        except InterruptedError:
            continue
        if pid == child:
            return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
