"""What the scoreboard reads from this machine: helper processes and their
peak RSS (/proc), CPU busy share, the page cache, memory warm-up, disk speed."""
from __future__ import annotations

import mmap
import os
import platform
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from . import MIB

POLL = 0.02  # helper/RSS sampling


def status_kib(pid: int | str, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def children(pid: int | str) -> list[str]:
    out: list[str] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += f.read().split()
        except OSError:
            pass
    return out


def cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def helper_tag(cmd: str) -> str | None:
    argv0 = os.path.basename(cmd.split(" ", 1)[0])
    if "fastsave.worker" in cmd:
        return "fastsave.worker"
    for tag in ("libvirt_iohelper", "lzop", "gzip", "zstd"):
        if argv0 == tag:
            return tag
    return None


class Watch(threading.Thread):
    """Samples, every POLL seconds: helper processes below this one (fastsave's
    engine child, libvirt's iohelper and compressors) with their VmHWM, and
    whether a QEMU process has started exiting (PF_EXITING) or is gone."""

    def __init__(self, qemu_pid: int | None = None) -> None:
        super().__init__(name="watch", daemon=True)
        self.qemu_pid = qemu_pid
        self.stop_flag = threading.Event()
        self.helpers: dict[str, dict[str, Any]] = {}
        self.unknown: set[str] = set()
        self.qemu_exiting: float | None = None
        self.qemu_gone: float | None = None

    def run(self) -> None:
        me = os.getpid()
        while not self.stop_flag.is_set():
            self.sample(me)
            self.stop_flag.wait(POLL)
        self.sample(me)

    def sample(self, me: int) -> None:
        now = time.perf_counter()
        kids = children(me)
        for pid in list(self.helpers):
            kids += children(pid)
        for pid in kids:
            if pid in self.helpers:
                continue
            tag = helper_tag(cmdline(pid))  # re-read until exec'd: a fresh fork shows our argv
            if tag:
                self.helpers[pid] = {"tag": tag, "seen": now, "alive": now, "gone": None,
                                     "hwm_kib": 0}
        for pid, h in self.helpers.items():
            if h["gone"] is not None:
                continue
            hwm = status_kib(pid, "VmHWM")
            if hwm is None:  # exited (a zombie has no mm left)
                h["gone"] = now
            else:
                h["alive"] = now
                h["hwm_kib"] = max(h["hwm_kib"], hwm)
        if self.qemu_pid and self.qemu_gone is None:
            try:
                with open(f"/proc/{self.qemu_pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if self.qemu_exiting is None and (int(fields[6]) & 0x4 or fields[0] in "ZX"):
                    self.qemu_exiting = now
            except (OSError, IndexError, ValueError):
                self.qemu_gone = now
                if self.qemu_exiting is None:
                    self.qemu_exiting = now

    def stop(self) -> None:
        self.stop_flag.set()
        self.join()

    def summary(self, t0: float) -> dict[str, Any]:
        helpers = []
        for pid, h in sorted(self.helpers.items(), key=lambda kv: kv[1]["seen"]):
            helpers.append({"pid": int(pid), "tag": h["tag"], "seen": h["seen"] - t0,
                            "gone": None if h["gone"] is None else h["gone"] - t0,
                            "hwm_kib": h["hwm_kib"]})
        return {"helpers": helpers,
                "qemu_exiting": None if self.qemu_exiting is None else self.qemu_exiting - t0,
                "qemu_gone": None if self.qemu_gone is None else self.qemu_gone - t0}


def cpu_busy() -> tuple[float, float]:
    """(busy, total) CPU ticks of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4], sum(v)


def busy_share(a: tuple[float, float], b: tuple[float, float]) -> float | None:
    return (b[0] - a[0]) / (b[1] - a[1]) if b[1] > a[1] else None


def uncache(path: Path) -> int | None:
    """Drops the image from the page cache: a start at host boot reads it
    from disk, and libvirt's buffered images would otherwise be read from RAM.
    Returns the bytes still cached afterwards (fincore), None if unknown."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "-o", "RES", str(path)],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def warm_memory(kib: int) -> float:
    """Touches and frees `kib` of anonymous memory (huge pages where the kernel
    gives them); returns the seconds it took.

    On a VM that reports free memory to its host (virtio-balloon free page
    reporting, as on the machines this was developed on), memory freed a few
    seconds ago is handed back to the host, and the next first touch of it
    faults on the host side: measured here, touching 1.5 GiB took 1-3.5 s
    after 3 s idle and 0.07 s right after a free. A new QEMU writing the
    incoming guest RAM pays that at random, whoever feeds it. Done right
    before a timed start, this puts that memory back in the guest's free
    lists, as a host without such reporting always has it."""
    import ctypes

    size = kib * 1024
    t = time.perf_counter()
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
        buf = (ctypes.c_char * size).from_buffer(m)
        ctypes.memset(ctypes.addressof(buf), 1, size)
        del buf
    finally:
        m.close()
    return time.perf_counter() - t


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def disk_speed(directory: Path, mib: int = 1024) -> dict[str, float]:
    """O_DIRECT sequential write (ending with fsync) and read of `mib` MiB of
    random data in `directory`, in MB/s: the disk's share of a save/restore."""
    src, path = Path("/dev/shm/fastsave-disk-speed"), directory / "disk-speed.tmp"
    out: dict[str, float] = {}
    try:
        with open(src, "wb") as f:  # staged in memory: /dev/urandom itself is slow
            for _ in range(mib):
                f.write(os.urandom(MIB))
        for key, argv in (
            ("write_mb_s", ["dd", f"if={src}", f"of={path}", "bs=4M", "oflag=direct",
                            "conv=fsync", "status=none"]),
            ("read_mb_s", ["dd", f"if={path}", "of=/dev/null", "bs=4M", "iflag=direct",
                           "status=none"]),
        ):
            t = time.perf_counter()
            subprocess.run(argv, check=True)
            out[key] = round(mib * MIB / (time.perf_counter() - t) / 1e6, 1)
    finally:
        path.unlink(missing_ok=True)
        src.unlink(missing_ok=True)
    return out


def memory_copy_speed(mib: int = 256, repeat: int = 3) -> float:
    """memcpy between two `mib` MiB buffers, best of `repeat`, in MB/s copied:
    what a migration thread moving guest RAM into a socket or pipe cannot
    exceed together with all the others (each byte is read and written)."""
    import ctypes

    size = mib * MIB
    src = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    dst = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        a = (ctypes.c_char * size).from_buffer(src)
        b = (ctypes.c_char * size).from_buffer(dst)
        ctypes.memset(ctypes.addressof(a), 7, size)
        ctypes.memset(ctypes.addressof(b), 0, size)  # both mapped before timing
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            ctypes.memmove(ctypes.addressof(b), ctypes.addressof(a), size)
            best = min(best, time.perf_counter() - t)
        del a, b
    finally:
        src.close()
        dst.close()
    return round(size / best / 1e6, 1)


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _, mnt, typ, *_ = line.split()
                if str(path).startswith(mnt) and len(mnt) > len(best):
                    best, kind = mnt, typ
    except OSError:
        pass
    return kind
