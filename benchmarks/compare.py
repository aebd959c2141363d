"""The scoreboard: libvirt's managed save next to fastsave's, on real QEMU guests.

usage: .venv/bin/python benchmarks/compare.py [--quick] [--rounds N] [--guests KEYS]
                                              [--out-name STEM] [--[no-]readme]

Every contender saves and restores the same test guest (tests/guest, its RAM
filled with deterministic guest-like data), in rounds that alternate the
contenders (A B C ... A B C ...). Contenders:

- libvirt `managedSave(0)` (raw image), `managedSave(VIR_DOMAIN_SAVE_BYPASS_CACHE)`,
  and libvirt with `save_image_format = "lzop"` / `"gzip"` (each in a private
  embedded root of its own, with its own domain defined from the same XML);
  restore is libvirt's start of the domain;
- on libvirt >= 10.4, libvirt with `save_image_format = "zstd"` (its own root
  too); on libvirt >= 11.2, libvirt's parallel save with 2 and 4 channels, with
  and without VIR_DOMAIN_SAVE_BYPASS_CACHE: `dom.saveParams()` to a plain file
  (image_format "sparse", parallel.channels; there is no managed parallel save)
  and `conn.restoreParams()` with the same channels and flags. Contenders the
  installed libvirt (`libvirt.getVersion()`) does not offer are left out of the
  run with the reason printed and recorded;
- fastsave `managed_save(dom, mode=M, direct=D)` for M in raw, zstd, auto and
  D in True, False; restore is `fastsave.start(dom)`;
- two limits: QEMU migrating into a pipe drained to /dev/null (producer) and
  QEMU taking an incoming migration from a stream held in memory (consumer).

A save is timed until its image is durable: fastsave syncs before returning;
after each libvirt call an fdatasync of the image is timed as well, and the
time the call itself returned is kept next to it (`save_returned_s`).
After each restore the guest's boot id must be the one it had before the save.
Outputs: benchmarks/results/STEM.{md,json,png}, STEM being compare (a --quick
run: compare-quick) or --out-name, and a block of the "Benchmark results"
section of README.md, one block per STEM (full runs and --out-name runs, or
as --readme / --no-readme say).

One embedded libvirt root serves one process, so each root is driven by an
agent process (this file with --agent) that the main process talks to with JSON
lines; only one guest runs at any time. Environment: FASTSAVE_COMPARE_DIR
(work directory, default /var/tmp/fastsave-compare; holds the roots, the guest
kernel and the fill files, which are kept for the next run).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import fcntl
import importlib.metadata
import json
import mmap
import os
import platform
import re
import select
import statistics
import subprocess
import sys
import threading
import time
import traceback
import uuid as uuidlib
from pathlib import Path
from typing import Any

import libvirt

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(HERE))

from reaper import orphan_reap_delay, wrap as under_reaper  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
SEED = 1
POLL = 0.02            # helper/RSS sampling and fastsave's own query-migrate interval
LIMIT_POLL = 0.005     # the limits poll QEMU faster: they are meant to be a bound
SETTLE = 0.3           # let a guest run a moment between a start and the next save
PIPE_SIZE = 1 << 20
WARM_EXTRA_KIB = 512 << 10  # beyond guest RAM: QEMU's own, the engine's buffers
UNLIMITED_BANDWIDTH = 1 << 40
OP_TIMEOUT = 900.0
WORK = Path(os.environ.get("FASTSAVE_COMPARE_DIR", "/var/tmp/fastsave-compare"))
RESULTS = HERE / "results"
README = REPO / "README.md"
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"
HELPERS = ("fastsave.worker", "libvirt_iohelper", "lzop", "gzip", "zstd")

VIR_DOMAIN_SAVE_BYPASS_CACHE = libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE
VIR_DOMAIN_START_BYPASS_CACHE = libvirt.VIR_DOMAIN_START_BYPASS_CACHE
# virDomainSaveParams / virDomainRestoreParams keys (spelled out for bindings
# older than the libvirt that knows them)
SAVE_PARAM_FILE = getattr(libvirt, "VIR_DOMAIN_SAVE_PARAM_FILE", "file")
SAVE_PARAM_IMAGE_FORMAT = getattr(libvirt, "VIR_DOMAIN_SAVE_PARAM_IMAGE_FORMAT", "image_format")
SAVE_PARAM_PARALLEL_CHANNELS = getattr(libvirt, "VIR_DOMAIN_SAVE_PARAM_PARALLEL_CHANNELS",
                                       "parallel.channels")
# libvirt versions (libvirt.getVersion() numbers) that offer a contender
LIBVIRT_ZSTD = 10_004_000       # save_image_format = "zstd"
LIBVIRT_PARALLEL = 11_002_000   # virDomainSaveParams with image_format "sparse" + parallel.channels


# --------------------------------------------------------------------------- guests

@dataclasses.dataclass(frozen=True)
class Guest:
    key: str
    mem_mib: int
    fill_mib: int
    rounds_full: int

    @property
    def name(self) -> str:
        return f"bench-{self.key}"

    @property
    def label(self) -> str:
        what = f"{self.fill_mib} MiB guest-like data" if self.fill_mib else "no fill (mostly idle)"
        return f"{self.mem_mib / 1024:g} GiB RAM, {what}"


GUESTS = {
    "mixed-512": Guest("mixed-512", 512, 384, 1),
    "mixed-1536": Guest("mixed-1536", 1536, 1024, 3),
    "idle-1536": Guest("idle-1536", 1536, 0, 1),
    "mixed-4096": Guest("mixed-4096", 4096, 3072, 1),
}
MAIN_GUEST = "mixed-1536"
QUICK_GUESTS = ["mixed-512", "mixed-1536"]
FULL_GUESTS = ["mixed-512", "mixed-1536", "idle-1536", "mixed-4096"]


@dataclasses.dataclass(frozen=True)
class Contender:
    key: str
    label: str
    agent: str          # which embedded root: main, lzop, gzip
    kind: str           # libvirt, libvirt-params, fastsave, producer, consumer
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    min_libvirt: int = 0  # libvirt.getVersion() it needs; left out of the run below that
    needs: str = ""       # what it needs, for the line that says why it was left out


CONTENDERS = [
    Contender("libvirt-raw", "libvirt managedSave", "main", "libvirt",
              {"flags": 0, "start_flags": 0}),
    Contender("fastsave-default", "fastsave auto (default)", "main", "fastsave",
              {"mode": "auto"}),
    Contender("fastsave-auto-direct", "fastsave auto+direct", "main", "fastsave",
              {"mode": "auto", "direct": True}),
    Contender("libvirt-bypass", "libvirt BYPASS_CACHE", "main", "libvirt",
              {"flags": VIR_DOMAIN_SAVE_BYPASS_CACHE, "start_flags": VIR_DOMAIN_START_BYPASS_CACHE}),
    Contender("fastsave-zstd-direct", "fastsave zstd+direct", "main", "fastsave",
              {"mode": "zstd", "direct": True}),
    Contender("fastsave-raw-direct", "fastsave raw+direct", "main", "fastsave",
              {"mode": "raw", "direct": True}),
    Contender("fastsave-auto", "fastsave auto (buffered)", "main", "fastsave",
              {"mode": "auto", "direct": False}),
    Contender("fastsave-zstd", "fastsave zstd (buffered)", "main", "fastsave",
              {"mode": "zstd", "direct": False}),
    Contender("fastsave-raw", "fastsave raw (buffered)", "main", "fastsave",
              {"mode": "raw", "direct": False}),
    Contender("limit-producer", "limit: QEMU -> pipe -> /dev/null", "main", "producer"),
    Contender("limit-consumer", "limit: memory -> pipe -> QEMU", "main", "consumer"),
    Contender("libvirt-lzop", "libvirt save_image_format=lzop", "lzop", "libvirt",
              {"flags": 0, "start_flags": 0}),
    Contender("libvirt-gzip", "libvirt save_image_format=gzip", "gzip", "libvirt",
              {"flags": 0, "start_flags": 0}),
    # libvirt >= 11.2: parallel save, only as a plain save to a file in the
    # "sparse" (mapped-ram) format; restored with virDomainRestoreParams
    Contender("libvirt-par2", "libvirt parallel 2 ch (sparse file)", "main", "libvirt-params",
              {"channels": 2, "flags": 0}, LIBVIRT_PARALLEL,
              "libvirt >= 11.2 (virDomainSaveParams with parallel.channels)"),
    Contender("libvirt-par4", "libvirt parallel 4 ch (sparse file)", "main", "libvirt-params",
              {"channels": 4, "flags": 0}, LIBVIRT_PARALLEL,
              "libvirt >= 11.2 (virDomainSaveParams with parallel.channels)"),
    Contender("libvirt-par2-bypass", "libvirt parallel 2 ch + BYPASS_CACHE", "main", "libvirt-params",
              {"channels": 2, "flags": VIR_DOMAIN_SAVE_BYPASS_CACHE}, LIBVIRT_PARALLEL,
              "libvirt >= 11.2 (virDomainSaveParams with parallel.channels)"),
    Contender("libvirt-par4-bypass", "libvirt parallel 4 ch + BYPASS_CACHE", "main", "libvirt-params",
              {"channels": 4, "flags": VIR_DOMAIN_SAVE_BYPASS_CACHE}, LIBVIRT_PARALLEL,
              "libvirt >= 11.2 (virDomainSaveParams with parallel.channels)"),
    # libvirt >= 10.4: zstd as a managed save image format
    Contender("libvirt-zstd", "libvirt save_image_format=zstd", "zstd", "libvirt",
              {"flags": 0, "start_flags": 0}, LIBVIRT_ZSTD, 'libvirt >= 10.4 (save_image_format = "zstd")'),
]
BY_KEY = {c.key: c for c in CONTENDERS}
# gzip on the 4 GiB guest alone would take ~5 min of the ~25 min budget
SKIP = {"mixed-4096": ("libvirt-gzip",)}
DEFAULT = "fastsave-default"
BASE = "libvirt-bypass"
RAW = "libvirt-raw"
SAVER_KINDS = ("libvirt", "libvirt-params", "fastsave")
SAVERS = [c.key for c in CONTENDERS if c.kind in SAVER_KINDS]


def available(libvirt_version: int) -> tuple[list[Contender], dict[str, str]]:
    """The contenders this libvirt can run, and why each other one is left out."""
    def ver(v: int) -> str:
        return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"

    run = [c for c in CONTENDERS if libvirt_version >= c.min_libvirt]
    left = {c.key: f"needs {c.needs}; this is libvirt {ver(libvirt_version)}"
            for c in CONTENDERS if libvirt_version < c.min_libvirt}
    return run, left


def fill_parts(g: Guest) -> list[tuple[Path, int]]:
    """(file, MiB) pieces of the guest's fill: whole GiB are shared between
    guests (1 GiB parts of one deterministic stream), a smaller fill is that
    stream's prefix. QEMU's loader reads a file with one read(), so no part
    may reach 2 GiB."""
    fill = WORK / "fill"
    if not g.fill_mib:
        return []
    if g.fill_mib % 1024 == 0:
        return [(fill / f"mixed-seed{SEED}-part{i}-1024MiB.bin", 1024)
                for i in range(g.fill_mib // 1024)]
    assert g.fill_mib < 1024
    return [(fill / f"mixed-seed{SEED}-{g.fill_mib}MiB.bin", g.fill_mib)]


def fill_addresses(g: Guest, sizes: list[int]) -> list[int]:
    """Guest-physical addresses (MiB) for the parts: from 16 MiB up in low
    RAM, then from 4 GiB (a pc machine with >= 3.5 GiB keeps 3 GiB low)."""
    low_top = g.mem_mib if g.mem_mib < 3584 else 3072
    high_end = 4096 + (g.mem_mib - low_top)
    addr, out = 16, []
    for s in sizes:
        if addr + s > low_top and addr < 4096:
            addr = 4096
        out.append(addr)
        addr += s
    if addr > (high_end if addr > 4096 else low_top):
        raise ValueError(f"{g.key}: the fill does not fit in guest RAM")
    return out


def write_fills(guests: list[Guest]) -> None:
    from testkit.mixed import mixed_chunks, write_mixed_file

    (WORK / "fill").mkdir(parents=True, exist_ok=True)
    for g in guests:
        parts = fill_parts(g)
        if all(p.exists() and p.stat().st_size == n * MIB for p, n in parts):
            continue
        print(f"   writing {g.fill_mib} MiB of guest-like fill for {g.key}", flush=True)
        if len(parts) == 1 and parts[0][1] < 1024:
            tmp = parts[0][0].with_suffix(".tmp")
            write_mixed_file(tmp, parts[0][1] * MIB, seed=SEED)
            tmp.rename(parts[0][0])
            continue
        chunks = mixed_chunks(len(parts) * GIB, seed=SEED, piece=8 * MIB)
        for path, n in parts:
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                left = n * MIB
                while left:
                    c = next(chunks)
                    f.write(c)
                    left -= len(c)
            if path.exists() and path.stat().st_size == n * MIB:
                tmp.unlink()
            else:
                tmp.rename(path)


def guest_xml(g: Guest, kernel: str, *, name: str | None = None, dom_uuid: str | None = None) -> str:
    from testkit import guest

    parts = fill_parts(g)
    addrs = fill_addresses(g, [n for _, n in parts])
    name = name or g.name
    dom_uuid = dom_uuid or str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"fastsave-compare/{name}"))
    xml = guest.domain_xml(name, kernel, g.mem_mib, dom_uuid=dom_uuid,
                           fill=str(parts[0][0]) if parts else None,
                           fill_addr=(addrs[0] * MIB) if parts else 0x1000000)
    extra = "".join(f"<qemu:arg value='-device'/>"
                    f"<qemu:arg value='loader,file={p},addr=0x{a * MIB:x},force-raw=on'/>"
                    for (p, _), a in zip(parts[1:], addrs[1:]))
    return xml.replace("</qemu:commandline>", extra + "</qemu:commandline>") if extra else xml


def without_fill(xml: str) -> str:
    """The domain XML without the loader devices that fill its RAM. The fill
    is loaded once, at the guest's first boot (see Agent.op_prime); guests
    then run and are saved and restored from this XML, so no start pays for
    reading the fill files again (a real guest has no such device)."""
    return re.sub(r"<qemu:commandline[^>]*>.*?</qemu:commandline>", "", xml, flags=re.S)


def with_incoming(xml: str) -> str:
    """The XML with `-incoming defer` added, as fastsave's restore builds it."""
    args = "<qemu:arg value='-incoming'/><qemu:arg value='defer'/>"
    if "</qemu:commandline>" in xml:
        return xml.replace("</qemu:commandline>", args + "</qemu:commandline>")
    qns = "http://libvirt.org/schemas/domain/qemu/1.0"
    return xml.replace("</domain>", f"<qemu:commandline xmlns:qemu='{qns}'>{args}"
                                    f"</qemu:commandline></domain>")


# --------------------------------------------------------------------------- agent side

def _status_kib(pid: int | str, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _children(pid: int | str) -> list[str]:
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


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _helper_tag(cmd: str) -> str | None:
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
        kids = _children(me)
        for pid in list(self.helpers):
            kids += _children(pid)
        for pid in kids:
            if pid in self.helpers:
                continue
            tag = _helper_tag(_cmdline(pid))  # re-read until exec'd: a fresh fork shows our argv
            if tag:
                self.helpers[pid] = {"tag": tag, "seen": now, "alive": now, "gone": None,
                                     "hwm_kib": 0}
        for pid, h in self.helpers.items():
            if h["gone"] is not None:
                continue
            hwm = _status_kib(pid, "VmHWM")
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


def _cpu_busy() -> tuple[float, float]:
    """(busy, total) CPU ticks of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4], sum(v)


def _busy_share(a: tuple[float, float], b: tuple[float, float]) -> float | None:
    return (b[0] - a[0]) / (b[1] - a[1]) if b[1] > a[1] else None


def _uncache(path: Path) -> int | None:
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


def _warm_memory(kib: int) -> float:
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


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Agent:
    """Drives one embedded root: defines, starts, saves and restores its domains."""

    def __init__(self, root: str, fmt: str | None) -> None:
        import fastsave
        import fastsave.connect
        import fastsave.managed as fm
        import libvirt

        self.libvirt, self.fastsave = libvirt, fastsave
        self.root = Path(root)
        conf = fastsave.connect.EMBED_QEMU_CONF + (f'save_image_format = "{fmt}"\n' if fmt else "")
        self.conn = fastsave.open_connection(fastsave.prepare_embed_root(root, qemu_conf=conf))
        self.trace: list[tuple[float, str, Any]] = []
        self.primes: dict[str, tuple[str, str]] = {}
        self._instrument(fm, libvirt)

    def _instrument(self, fm: Any, libvirt: Any) -> None:
        """Timestamps for the breakdown: fastsave's QMP calls, its engine child,
        and the libvirt calls it makes. Behaviour is unchanged."""
        import importlib

        import fastsave.virt
        import fastsave.worker

        trace = self.trace
        orig_qmp = fastsave.virt.qmp

        def qmp(dom: Any, command: str, arguments: Any = None, fds: Any = None) -> Any:
            r = orig_qmp(dom, command, arguments, fds)
            detail = r.get("status") if command == "query-migrate" and isinstance(r, dict) else None
            trace.append((time.perf_counter(), command, detail))
            return r

        class TracedEngine(fastsave.worker.EngineProcess):  # type: ignore[misc]
            last: Any = None

            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, **kw)
                TracedEngine.last = self

        # the managed layer's modules (one module in older trees) hold their own
        # references to qmp and EngineProcess
        mods = [fm]
        for n in ("saving", "restoring", "watch", "recovery"):
            try:
                mods.append(importlib.import_module(f"fastsave.{n}"))
            except ImportError:
                pass
        for mod in mods:
            if hasattr(mod, "qmp"):
                mod.qmp = qmp
            if hasattr(mod, "EngineProcess"):
                mod.EngineProcess = TracedEngine
        self.engine_cls = TracedEngine

        def wrap(cls: Any, name: str) -> None:
            orig = getattr(cls, name)

            def call(*a: Any, **kw: Any) -> Any:
                trace.append((time.perf_counter(), name + ":start", None))
                try:
                    return orig(*a, **kw)
                finally:
                    trace.append((time.perf_counter(), name + ":end", None))

            setattr(cls, name, call)

        for n in ("suspend", "resume", "destroy"):
            wrap(libvirt.virDomain, n)
        wrap(libvirt.virConnect, "createXML")

    # helpers
    def dom(self, name: str) -> Any:
        return self.conn.lookupByName(name)

    def qemu_pid(self, name: str) -> int | None:
        try:
            return int((self.root / "run" / "qemu" / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def libvirt_image(self, name: str) -> Path:
        return self.root / "lib" / "qemu" / "save" / f"{name}.save"

    def params_image(self, name: str) -> Path:
        """Where the virDomainSaveParams contenders save (a plain save file)."""
        return self.root / "params-save" / f"{name}.save"

    def fastsave_image(self, dom: Any) -> Path:
        return Path(self.fastsave.image_store(self.conn).image_path(dom.UUIDString()))

    def _remove_images(self, dom: Any) -> None:
        self.fastsave.managed_save_remove(dom)
        if dom.hasManagedSaveImage(0):
            dom.managedSaveRemove(0)

    def _lookup(self, name: str) -> Any:
        try:
            return self.conn.lookupByName(name)
        except self.libvirt.libvirtError:
            return None

    def _events(self, t0: float) -> list[tuple[float, str, Any]]:
        return [(t - t0, what, detail) for t, what, detail in self.trace if t >= t0]

    # ops
    def op_info(self) -> dict[str, Any]:
        def ver(v: int) -> str:
            return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"

        return {"libvirt": ver(self.conn.getLibVersion()), "qemu": ver(self.conn.getVersion()),
                "fastsave": importlib.metadata.version("fastsave")}

    def op_define(self, name: str, xml: str, prime: str) -> dict[str, Any]:
        from testkit import guest

        for n in (name, name + "-limit"):
            old = self._lookup(n)
            if old is not None:
                guest.discard(old)
        self.conn.defineXML(without_fill(xml))
        self.primes[name] = (prime, without_fill(xml))
        return {}

    def op_prime(self, name: str, xml: str, path: str) -> dict[str, Any]:
        """Boots the guest once with its fill loaded and saves it with
        libvirt's plain save (raw: this agent's root has no image format
        set) to `path`: every later start of the guest, in any root, is a
        restore of that file with the fill-free XML."""
        from testkit import guest

        t = time.perf_counter()
        live = self.conn.createXML(xml, 0)
        guest.wait_booted(live, timeout=180)
        live.save(path)
        return {"prime_s": time.perf_counter() - t}

    def op_undefine(self, name: str) -> dict[str, Any]:
        self.op_recover(name)
        dom = self._lookup(name)
        if dom is not None:
            dom.undefine()
        return {}

    def op_recover(self, name: str) -> dict[str, Any]:
        """After a failure: nothing running, no images; the next use boots fresh."""
        lim = self._lookup(name + "-limit")
        if lim is not None and lim.isActive():
            lim.destroy()
        dom = self._lookup(name)
        if dom is not None:
            if dom.isActive():
                dom.destroy()
            self._remove_images(dom)
        self.params_image(name).unlink(missing_ok=True)
        return {}

    def op_ensure_running(self, name: str) -> dict[str, Any]:
        from testkit import guest

        dom = self.dom(name)
        if dom.isActive():
            if dom.state()[0] == self.libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
            return {"boot_s": 0.0}
        self._remove_images(dom)
        t = time.perf_counter()
        prime, xml = self.primes[name]
        self.conn.restoreFlags(prime, xml, self.libvirt.VIR_DOMAIN_SAVE_RUNNING)
        guest.wait_booted(self.dom(name), timeout=180)
        return {"boot_s": time.perf_counter() - t}

    def op_park(self, name: str) -> dict[str, Any]:
        dom = self._lookup(name)
        if dom is None or not dom.isActive():
            return {"destroy_s": 0.0}
        t = time.perf_counter()
        dom.destroy()
        return {"destroy_s": time.perf_counter() - t}

    def op_contender(self, name: str, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        from testkit import guest

        dom = self.dom(name)
        res: dict[str, Any] = {"boot_s": self.op_ensure_running(name)["boot_s"]}
        time.sleep(SETTLE)
        before = guest.read_state(dom)
        os.sync()
        qpid = self.qemu_pid(name)

        # save
        self.trace.clear()
        self.engine_cls.last = None
        watch = Watch(qpid)
        _reset_hwm()
        rss0 = _status_kib("self", "VmRSS") or 0
        watch.start()
        cpu0 = _cpu_busy()
        t0 = time.perf_counter()
        path = (self.libvirt_image(name) if kind == "libvirt" else
                self.params_image(name) if kind == "libvirt-params" else None)
        try:
            if kind == "libvirt":
                dom.managedSave(params["flags"])
            elif kind == "libvirt-params":
                path.parent.mkdir(parents=True, exist_ok=True)
                path.unlink(missing_ok=True)
                dom.saveParams({SAVE_PARAM_FILE: str(path), SAVE_PARAM_IMAGE_FORMAT: "sparse",
                                SAVE_PARAM_PARALLEL_CHANNELS: params["channels"]}, params["flags"])
            else:
                self.fastsave.managed_save(dom, **params)
        finally:
            t1 = time.perf_counter()
            watch.stop()
        t2 = t1
        if path is not None:
            # libvirt's call may return before the image is on disk (its
            # iohelper fdatasyncs; a sparse save is written by QEMU itself):
            # the save counts until an fdatasync of the image has returned.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            t2 = time.perf_counter()
        res["save_s"] = t2 - t0
        res["save_returned_s"] = t1 - t0
        res["save_sync_s"] = t2 - t1
        res["busy_save"] = _busy_share(cpu0, _cpu_busy())
        res["inproc_hwm_growth_kib"] = max(0, (_status_kib("self", "VmHWM") or 0) - rss0)
        res["save_watch"] = watch.summary(t0)
        res["save_events"] = self._events(t0)
        if kind == "fastsave" and self.engine_cls.last is not None:
            res["save_stats"] = dataclasses.asdict(self.engine_cls.last.result(timeout=10))
        if path is None:
            path = self.fastsave_image(dom)
        st = path.stat()
        res["image_bytes"] = st.st_size
        res["image_alloc_bytes"] = st.st_blocks * 512
        if kind == "libvirt-params":  # sparse: what it takes on disk, not its length
            res["image_bytes"], res["image_apparent_bytes"] = st.st_blocks * 512, st.st_size
        os.sync()
        res["image_cached_bytes"] = _uncache(path)

        # restore
        res["warm_s"] = _warm_memory(dom.maxMemory() + WARM_EXTRA_KIB)
        self.trace.clear()
        self.engine_cls.last = None
        watch = Watch(None)
        watch.start()
        cpu0 = _cpu_busy()
        t0 = time.perf_counter()
        try:
            if kind == "libvirt":
                dom.createWithFlags(params["start_flags"])
            elif kind == "libvirt-params":
                self.conn.restoreParams({SAVE_PARAM_FILE: str(path),
                                         SAVE_PARAM_PARALLEL_CHANNELS: params["channels"]},
                                        params["flags"])
            else:
                self.fastsave.start(dom, **{k: v for k, v in params.items() if k != "mode"})
        finally:
            t1 = time.perf_counter()
            watch.stop()
        res["restore_s"] = t1 - t0
        res["busy_restore"] = _busy_share(cpu0, _cpu_busy())
        res["restore_watch"] = watch.summary(t0)
        res["restore_events"] = self._events(t0)
        if kind == "fastsave" and self.engine_cls.last is not None:
            res["restore_stats"] = dataclasses.asdict(self.engine_cls.last.result(timeout=10))
        after = guest.read_state(dom)
        res["boot_id_before"], res["boot_id_after"] = before.boot_id, after.boot_id
        res["counter_before"], res["counter_after"] = before.counter, after.counter
        res["state_ok"] = after.boot_id == before.boot_id and dom.isActive()
        res["image_gone"] = not path.exists()
        if kind == "libvirt-params":  # a plain save file stays; libvirt's managed one is removed
            path.unlink(missing_ok=True)
        return res

    def _migrate_out(self, dom: Any, fd: int) -> tuple[float, dict[str, Any]]:
        """getfd + migrate on a paused domain; polls until QEMU reports the end.
        Returns (time the migrate command returned, final query-migrate)."""
        from fastsave.virt import qmp

        try:
            qmp(dom, "getfd", {"fdname": "bench"}, fds=[fd])
        finally:
            os.close(fd)
        qmp(dom, "migrate", {"uri": "fd:bench"})
        t_mig = time.perf_counter()
        while True:
            info = qmp(dom, "query-migrate") or {}
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(LIMIT_POLL)
        if info.get("status") != "completed":
            raise RuntimeError(f"QEMU migration {info.get('status')}: {info.get('error-desc')}")
        return t_mig, info

    def op_producer(self, name: str) -> dict[str, Any]:
        """QEMU migrating a paused guest into a pipe that is drained to /dev/null."""
        from fastsave.virt import qmp

        dom = self.dom(name)
        res: dict[str, Any] = {"boot_s": self.op_ensure_running(name)["boot_s"]}
        time.sleep(SETTLE)
        os.sync()
        watch = Watch(self.qemu_pid(name))
        r, w = os.pipe2(os.O_CLOEXEC)
        fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        got = [0]

        def drain() -> None:
            null = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
            try:
                while True:
                    try:
                        n = os.splice(r, null, PIPE_SIZE)
                    except OSError:
                        n = len(os.read(r, PIPE_SIZE))
                    if not n:
                        return
                    got[0] += n
            finally:
                os.close(null)
                os.close(r)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        watch.start()
        t0 = time.perf_counter()
        try:
            dom.suspend()
            qmp(dom, "migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH})
            t_mig, info = self._migrate_out(dom, w)
            t_done = time.perf_counter()
            reader.join(60)
            t_d0 = time.perf_counter()
            dom.destroy()
            t1 = time.perf_counter()
        finally:
            watch.stop()
        ram = info.get("ram", {})
        res.update(save_s=t1 - t0, stream_bytes=got[0], prepare_s=t_mig - t0,
                   stream_s=t_done - t_mig, destroy_s=t1 - t_d0, data_done_s=t_done - t0,
                   qemu_total_time_ms=info.get("total-time"), ram=ram,
                   save_watch=watch.summary(t0))
        return res

    def op_capture(self, name: str, path: str) -> dict[str, Any]:
        """The guest's migration stream, written by QEMU into a file in /dev/shm."""
        from fastsave.virt import qmp
        from testkit import guest

        dom = self.dom(name)
        self.op_ensure_running(name)
        time.sleep(SETTLE)
        state = guest.read_state(dom)
        dom.suspend()
        qmp(dom, "migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH})
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        t0 = time.perf_counter()
        self._migrate_out(dom, fd)
        secs = time.perf_counter() - t0
        dom.destroy()
        return {"bytes": os.path.getsize(path), "boot_id": state.boot_id, "seconds": secs}

    def op_consumer(self, name: str, xml: str, path: str, boot_id: int) -> dict[str, Any]:
        """QEMU started paused with -incoming defer, fed the captured stream
        from memory through a pipe; timed until it runs the guest."""
        from fastsave.virt import qmp
        from testkit import guest

        libvirt = self.libvirt
        old = self._lookup(name + "-limit")
        if old is not None and old.isActive():
            old.destroy()
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        view = memoryview(mm)
        sum(view[i] for i in range(0, size, 4096))  # every page mapped before the clock starts
        os.sync()
        r, w = os.pipe2(os.O_CLOEXEC)
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)

        def feed() -> None:
            off = 0
            try:
                while off < size:
                    off += os.write(w, view[off:off + PIPE_SIZE])
            except OSError:
                pass
            finally:
                os.close(w)

        feeder = threading.Thread(target=feed, daemon=True)
        live = None
        res: dict[str, Any] = {"stream_bytes": size}
        mem = re.search(r"<memory unit='MiB'>(\d+)</memory>", xml)
        res["warm_s"] = _warm_memory(int(mem.group(1)) * 1024 + WARM_EXTRA_KIB) if mem else None
        t0 = time.perf_counter()
        try:
            live = self.conn.createXML(with_incoming(xml), libvirt.VIR_DOMAIN_START_PAUSED)
            t_started = time.perf_counter()
            try:
                qmp(live, "getfd", {"fdname": "bench"}, fds=[r])
            finally:
                os.close(r)
                r = -1
            feeder.start()
            qmp(live, "migrate-incoming", {"uri": "fd:bench"})
            t_mig = time.perf_counter()
            while True:
                info = qmp(live, "query-migrate") or {}
                if info.get("status") in ("completed", "failed", "cancelled"):
                    break
                time.sleep(LIMIT_POLL)
            t_done = time.perf_counter()
            if info.get("status") != "completed":
                raise RuntimeError(f"incoming migration {info.get('status')}: "
                                   f"{info.get('error-desc')}")
            live.resume()
            t1 = time.perf_counter()
            feeder.join(60)
            state = guest.read_state(live)
            res.update(restore_s=t1 - t0, qemu_start_s=t_started - t0, stream_s=t_done - t_mig,
                       resume_s=t1 - t_done, state_ok=state.boot_id == boot_id)
            t_d = time.perf_counter()
            live.destroy()
            res["destroy_s"] = time.perf_counter() - t_d
        finally:
            if r >= 0:
                os.close(r)
            try:
                if live is not None and live.isActive():
                    live.destroy()
            except libvirt.libvirtError:
                pass  # a transient domain is gone once destroyed
            if feeder.is_alive():
                feeder.join(10)
            view.release()
            mm.close()
        return res


def agent_main(root: str, fmt: str | None) -> int:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to the log, never into the replies
    sys.stdout = sys.stderr
    agent = Agent(root, fmt)
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        if op == "quit":
            replies.write(json.dumps({"ok": True, "result": {}}) + "\n")
            break
        try:
            reply = {"ok": True, "result": getattr(agent, "op_" + op)(**req)}
        except Exception as e:  # noqa: BLE001 - reported to the main process
            traceback.print_exc()
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")
    agent.conn.close()
    return 0


# --------------------------------------------------------------------------- main side

class AgentError(Exception):
    pass


class AgentProc:
    def __init__(self, key: str, fmt: str | None) -> None:
        self.key, self.fmt = key, fmt
        self.root = WORK / "roots" / key
        self.log = WORK / "logs" / f"agent-{key}.log"
        self._start()

    def _start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        argv = [sys.executable, str(Path(__file__).resolve()), "--agent", str(self.root)]
        if self.fmt:
            argv += ["--format", self.fmt]
        with open(self.log, "a") as log:
            # under the reaping shim: a stopped QEMU is reaped at once (reaper.py)
            self.proc = subprocess.Popen(under_reaper(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, text=True, bufsize=1, cwd=str(REPO))

    def call(self, op: str, timeout: float = OP_TIMEOUT, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.restart()
            raise AgentError(f"agent {self.key} had died; restarted") from None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            why = "timed out" if not ready else "died"
            self.restart()
            raise AgentError(f"agent {self.key} {why} during {op}; restarted (log: {self.log})")
        msg = json.loads(line)
        if not msg["ok"]:
            raise AgentError(msg["error"])
        return msg["result"]

    def restart(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._start()

    def close(self) -> None:
        try:
            self.call("quit", timeout=60)
        except (AgentError, OSError, ValueError):
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


class Runner:
    def __init__(self, quick: bool, rounds: int | None = None,
                 guests: list[str] | None = None) -> None:
        self.quick = quick
        self.rounds_override = rounds
        self.guest_keys = guests or (QUICK_GUESTS if quick else FULL_GUESTS)
        self.contenders, self.skipped = available(libvirt.getVersion())
        self.t_start = time.monotonic()
        self.load_start = os.getloadavg()
        self.agents: dict[str, AgentProc] = {}
        self.running: set[tuple[str, str]] = set()
        self.rounds: list[dict[str, Any]] = []
        self.captures: dict[str, dict[str, Any]] = {}
        self.defined: set[tuple[str, str]] = set()
        self.kernel = ""
        self.info: dict[str, Any] = {}

    def rounds_for(self, g: Guest) -> int:
        if self.rounds_override:
            return self.rounds_override
        return 1 if self.quick else g.rounds_full

    def say(self, msg: str) -> None:
        el = time.monotonic() - self.t_start
        print(f"[{int(el // 60):02d}:{int(el % 60):02d}] {msg}", flush=True)

    def agent(self, key: str) -> AgentProc:
        if key not in self.agents:
            fmt = None if key == "main" else key
            self.agents[key] = AgentProc(key, fmt)
        return self.agents[key]

    def define(self, akey: str, g: Guest) -> None:
        if (akey, g.name) not in self.defined:
            self.agent(akey).call("define", name=g.name, xml=guest_xml(g, self.kernel),
                                  prime=str(self.prime_path(g)))
            self.defined.add((akey, g.name))

    def prime_path(self, g: Guest) -> Path:
        return WORK / "prime" / f"{g.key}.save"

    def prime(self, g: Guest) -> None:
        """The guest's first boot, fill loaded, saved for every later start."""
        path = self.prime_path(g)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        self.define("main", g)
        self.park_others(None)
        res = self.agent("main").call("prime", name=g.name, xml=guest_xml(g, self.kernel),
                                      path=str(path))
        self.say(f"   first boot of {g.key} with its fill, saved for later starts: "
                 f"{res['prime_s']:.1f} s")

    def park_others(self, keep: tuple[str, str] | None) -> None:
        for akey, name in sorted(self.running):
            if (akey, name) != keep:
                self.agent(akey).call("park", name=name)
                self.running.discard((akey, name))

    def recover(self, akey: str, g: Guest) -> None:
        try:
            self.agent(akey).call("recover", name=g.name)
        except AgentError as e:
            self.say(f"   recovery of {g.key} in {akey} failed: {e}")
        self.running.discard((akey, g.name))

    def run_one(self, g: Guest, c: Contender, rnd: int) -> dict[str, Any]:
        a = self.agent(c.agent)
        self.define(c.agent, g)
        rec: dict[str, Any] = {"guest": g.key, "round": rnd, "contender": c.key,
                               "started": time.time()}
        try:
            if c.kind in SAVER_KINDS:
                self.park_others((c.agent, g.name))
                res = a.call("contender", name=g.name, kind=c.kind, params=c.params)
                self.running.add((c.agent, g.name))
                rec.update(res, ok=bool(res["state_ok"]))
                if not res["state_ok"]:
                    rec["error"] = (f"state did not come back (boot id {res['boot_id_before']:#x} "
                                    f"-> {res['boot_id_after']:#x})")
            elif c.kind == "producer":
                self.park_others((c.agent, g.name))
                res = a.call("producer", name=g.name)
                self.running.discard((c.agent, g.name))
                rec.update(res, ok=True)
            else:
                cap = self.captures.get(g.key)
                if cap is None:
                    self.park_others((c.agent, g.name))
                    path = f"/dev/shm/fastsave-compare-{g.key}.stream"
                    cap = a.call("capture", name=g.name, path=path)
                    cap["path"] = path
                    self.captures[g.key] = cap
                    self.say(f"   captured {g.key}'s stream: {cap['bytes'] / 1e6:.0f} MB "
                             f"in {cap['seconds']:.2f} s")
                self.park_others(None)
                self.running.discard((c.agent, g.name))
                lim = guest_xml(g, self.kernel, name=g.name + "-limit",
                                dom_uuid=str(uuidlib.uuid5(uuidlib.NAMESPACE_URL,
                                                           f"fastsave-compare/{g.name}-limit")))
                res = a.call("consumer", name=g.name, xml=without_fill(lim), path=cap["path"],
                             boot_id=cap["boot_id"])
                rec.update(res, ok=bool(res["state_ok"]))
                if not res["state_ok"]:
                    rec["error"] = "the consumer limit's guest did not come back"
        except AgentError as e:
            rec.update(ok=False, error=str(e))
            self.recover(c.agent, g)
        return rec

    def describe(self, rec: dict[str, Any]) -> str:
        c = BY_KEY[rec["contender"]]
        if not rec.get("ok"):
            return f"{c.label}: FAILED: {rec.get('error')}"
        parts = []
        if "save_s" in rec:
            parts.append(f"save {rec['save_s']:.2f} s")
        if "restore_s" in rec:
            parts.append(f"restore {rec['restore_s']:.2f} s")
        if "image_bytes" in rec:
            parts.append(f"image {rec['image_bytes'] / 1e6:.0f} MB")
        if "stream_bytes" in rec:
            parts.append(f"stream {rec['stream_bytes'] / 1e6:.0f} MB")
        rss = helper_rss_kib(rec)
        if rss:
            parts.append(f"helper RSS {rss / 1024:.1f} MiB")
        if rec.get("image_cached_bytes"):
            parts.append(f"{rec['image_cached_bytes'] / 1e6:.0f} MB of the image still cached")
        if "state_ok" in rec:
            parts.append("state back" if rec["state_ok"] else "STATE LOST")
        return f"{c.label}: " + ", ".join(parts)

    def run(self) -> dict[str, Any]:
        from testkit import guest

        guests = [GUESTS[k] for k in self.guest_keys]
        WORK.mkdir(parents=True, exist_ok=True)
        self.say(f"work directory {WORK}; building the test guest and its fill files")
        self.kernel = guest.build_kernel(WORK / "guest")
        write_fills(guests)
        self.disk = disk_speed(WORK)
        self.say(f"disk with O_DIRECT: write {self.disk['write_mb_s']:.0f} MB/s, "
                 f"read {self.disk['read_mb_s']:.0f} MB/s")
        self.reap_delay = orphan_reap_delay()
        self.say(f"this machine's init reaps an orphan after {self.reap_delay:.2f} s; "
                 "the agents reap their QEMUs at once")
        self.info = self.agent("main").call("info")
        self.say(f"libvirt {self.info['libvirt']}, QEMU {self.info['qemu']}: "
                 f"{len(self.contenders)} contenders")
        for key, why in self.skipped.items():
            self.say(f"   left out: {BY_KEY[key].label} ({key}): {why}")
        try:
            for g in guests:
                n = self.rounds_for(g)
                self.say(f"== guest {g.key}: {g.label}; {n} round(s) of {len(self.contenders)} contenders")
                self.prime(g)
                for rnd in range(1, n + 1):
                    for c in self.contenders:
                        if self.quick is False and c.key in SKIP.get(g.key, ()):
                            continue
                        for attempt in (1, 2):  # a failed round is kept, and tried once more
                            rec = self.run_one(g, c, rnd)
                            rec["attempt"] = attempt
                            rec["loadavg"] = os.getloadavg()[0]
                            self.rounds.append(rec)
                            self.say(f"   {g.key} r{rnd}/{n} {self.describe(rec)}")
                            if rec.get("ok"):
                                break
                self.park_others(None)
                for akey in list(self.agents):
                    if (akey, g.name) in self.defined:
                        try:
                            self.agent(akey).call("undefine", name=g.name)
                        except AgentError as e:
                            self.say(f"   undefine {g.key} in {akey}: {e}")
                        self.defined.discard((akey, g.name))
                cap = self.captures.pop(g.key, None)
                if cap:
                    Path(cap["path"]).unlink(missing_ok=True)
                self.prime_path(g).unlink(missing_ok=True)
        finally:
            for cap in self.captures.values():
                Path(cap["path"]).unlink(missing_ok=True)
            for a in self.agents.values():
                a.close()
        return {
            "meta": {
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "quick": self.quick, "args": sys.argv[1:], "host": platform.node(), "os": os_name(),
                "kernel": platform.release(),
                "cpus": os.cpu_count(), "mem_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                          * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
                "work_dir": str(WORK), "fs": fs_type(WORK), **self.info,
                "init_reap_delay_s": round(self.reap_delay, 3), "disk": self.disk,
                "duration_s": round(time.monotonic() - self.t_start, 1),
                "load_avg_start": self.load_start, "load_avg_end": os.getloadavg(),
            },
            "guests": {g.key: {"mem_mib": g.mem_mib, "fill_mib": g.fill_mib, "label": g.label,
                               "rounds": self.rounds_for(g)} for g in guests},
            "contenders": {c.key: {"label": c.label, "root": c.agent, "kind": c.kind,
                                   "params": c.params} for c in self.contenders},
            "skipped": self.skipped,
            "rounds": self.rounds,
        }


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


# --------------------------------------------------------------------------- analysis

def helper_rss_kib(rec: dict[str, Any]) -> int:
    w = rec.get("save_watch") or {}
    return max((h["hwm_kib"] for h in w.get("helpers", [])), default=0)


def helper_tags(rec: dict[str, Any]) -> str:
    w = rec.get("save_watch") or {}
    tags = []
    for h in w.get("helpers", []):
        short = {"fastsave.worker": "engine", "libvirt_iohelper": "iohelper"}.get(h["tag"], h["tag"])
        if short not in tags:
            tags.append(short)
    return "+".join(tags)


def _event(rec: dict[str, Any], key: str, what: str, detail: Any = None,
           last: bool = False) -> float | None:
    hits = [t for t, w, d in rec.get(key, []) if w == what and (detail is None or d == detail)]
    if not hits:
        return None
    return hits[-1] if last else hits[0]


def phases(rec: dict[str, Any]) -> dict[str, float | None]:
    """Where a round's time went (seconds; None when not observable)."""
    c = BY_KEY[rec["contender"]]
    out: dict[str, float | None] = {}
    if c.kind == "producer":
        out.update(prepare=rec["prepare_s"], stream=rec["stream_s"], durable=rec["data_done_s"],
                   teardown=rec["save_s"] - rec["data_done_s"], destroy=rec["destroy_s"])
    elif c.kind == "consumer":
        out.update(r_qemu_start=rec["qemu_start_s"], r_stream=rec["stream_s"],
                   r_after=rec["resume_s"])
    elif c.kind in SAVER_KINDS:
        sw = rec.get("save_watch") or {}
        gone = [h["gone"] for h in sw.get("helpers", []) if h["gone"] is not None]
        durable = max(gone) if gone else None
        if c.kind == "fastsave":
            mig = _event(rec, "save_events", "migrate")
            done = _event(rec, "save_events", "query-migrate", "completed")
            d0 = _event(rec, "save_events", "destroy:start", last=True)
            d1 = _event(rec, "save_events", "destroy:end", last=True)
            out.update(prepare=mig, stream=(done - mig) if mig is not None and done is not None else None,
                       destroy=(d1 - d0) if d0 is not None and d1 is not None else None)
        out["durable"] = durable
        out["teardown"] = (rec.get("save_returned_s", rec["save_s"]) - durable
                           if durable is not None else None)
        out["sync"] = rec.get("save_sync_s")
        rw = rec.get("restore_watch") or {}
        rgone = [h["gone"] for h in rw.get("helpers", []) if h["gone"] is not None]
        if c.kind == "fastsave":
            s0 = _event(rec, "restore_events", "createXML:start")
            s1 = _event(rec, "restore_events", "createXML:end")
            mig = _event(rec, "restore_events", "migrate-incoming")
            done = _event(rec, "restore_events", "query-migrate", "completed")
            out.update(r_qemu_start=(s1 - s0) if s0 is not None and s1 is not None else None,
                       r_stream=(done - mig) if mig is not None and done is not None else None,
                       r_after=rec["restore_s"] - done if done is not None else None)
        out["r_read"] = max(rgone) if rgone else None
    if "save_watch" in rec:
        w = rec["save_watch"]
        if w.get("qemu_exiting") is not None and w.get("qemu_gone") is not None:
            out["qemu_exit"] = w["qemu_gone"] - w["qemu_exiting"]
    return out


def med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(data: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """{guest: {contender: medians and counts}} over the rounds that succeeded."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for gkey in data["guests"]:
        out[gkey] = {}
        for c in CONTENDERS:
            recs = [r for r in data["rounds"] if r["guest"] == gkey and r["contender"] == c.key]
            if not recs:
                continue
            good = [r for r in recs if r.get("ok")]
            s: dict[str, Any] = {"rounds": len(recs), "failures": len(recs) - len(good),
                                 "errors": [r.get("error") for r in recs if not r.get("ok")]}
            for k in ("busy_save", "busy_restore"):
                s[k] = med([r.get(k) for r in good])
            for k in ("save_s", "restore_s", "image_bytes", "stream_bytes", "save_returned_s",
                      "save_sync_s", "image_apparent_bytes"):
                s[k] = med([r.get(k) for r in good])
                vals = [r[k] for r in good if r.get(k) is not None]
                if vals:
                    s[k + "_min"], s[k + "_max"] = min(vals), max(vals)
            rss = [helper_rss_kib(r) for r in good if helper_rss_kib(r)]
            s["helper_rss_kib"] = max(rss) if rss else None
            s["helper_tags"] = helper_tags(good[0]) if good else ""
            s["inproc_hwm_growth_kib"] = med([r.get("inproc_hwm_growth_kib") for r in good])
            ph = [phases(r) for r in good]
            s["phases"] = {k: med([p.get(k) for p in ph]) for k in sorted({k for p in ph for k in p})}
            for which in ("save_stats", "restore_stats"):
                st = [r[which] for r in good if which in r]
                if st:
                    s[which] = {k: med([x[k] for x in st]) for k in st[0]
                                if isinstance(st[0][k], (int, float)) and not isinstance(st[0][k], bool)}
                    s[which]["direct"] = st[0].get("direct")
                    s[which]["spliced"] = st[0].get("spliced")
            out[gkey][c.key] = s
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def check(label: str, value: float | None, limit: float, strict: bool = False) -> dict[str, Any]:
    if value is None:
        return {"label": label, "status": "SKIP", "line": f"SKIP {label}: no data"}
    ok = value < limit if strict else value <= limit
    margin = 1 - value / limit
    op = "<" if strict else "<="
    status = "PASS" if ok else "MISS"
    return {"label": label, "status": status, "value": value, "limit": limit, "margin": margin,
            "line": f"{status} {label}: {value:.3f} (target {op} {limit:g}, margin {margin:+.1%})"}


def fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares line (slope, intercept)."""
    if len(points) < 2:
        return None
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return slope, my - slope * mx


def scaling(data: dict[str, Any], summ: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for gkey, g in data["guests"].items():
        s = summ[gkey]
        rows.append({
            "guest": gkey, "mem_gib": g["mem_mib"] / 1024, "fill_mib": g["fill_mib"],
            "stream_bytes": (s.get("limit-producer") or {}).get("stream_bytes"),
            "fs_save_s": (s.get(DEFAULT) or {}).get("save_s"),
            "fs_rss_kib": (s.get(DEFAULT) or {}).get("helper_rss_kib"),
            "lv_save_s": (s.get(BASE) or {}).get("save_s"),
            "lv_rss_kib": (s.get(BASE) or {}).get("helper_rss_kib"),
            "lv_inproc_kib": (s.get(BASE) or {}).get("inproc_hwm_growth_kib"),
            "producer_s": (s.get("limit-producer") or {}).get("save_s"),
        })
    mixed = [r for r in rows if r["fill_mib"]]

    def slope(key: str, scale: float = 1.0) -> float | None:
        f = fit([(r["mem_gib"], r[key] * scale) for r in mixed if r[key] is not None])
        return None if f is None else f[0]

    slopes = {"fs_save_s": slope("fs_save_s"), "fs_rss_mib": slope("fs_rss_kib", 1 / 1024),
              "lv_save_s": slope("lv_save_s"), "lv_rss_mib": slope("lv_rss_kib", 1 / 1024),
              "producer_s": slope("producer_s")}
    return {"rows": rows, "slopes": slopes}


def targets(summ: dict[str, Any], scal: dict[str, Any]) -> list[dict[str, Any]]:
    s = summ.get(MAIN_GUEST, {})

    def get(key: str, field: str) -> float | None:
        return (s.get(key) or {}).get(field)

    out = [
        check("1.5 GiB: fastsave default save time / libvirt BYPASS_CACHE save time",
              ratio(get(DEFAULT, "save_s"), get(BASE, "save_s")), 0.6),
        check("1.5 GiB: fastsave default image / libvirt raw image",
              ratio(get(DEFAULT, "image_bytes"), get(RAW, "image_bytes")), 0.85),
        check("1.5 GiB: fastsave zstd+direct save time / libvirt BYPASS_CACHE save time",
              ratio(get("fastsave-zstd-direct", "save_s"), get(BASE, "save_s")), 1.0),
        check("1.5 GiB: fastsave zstd (buffered) save time / libvirt BYPASS_CACHE save time",
              ratio(get("fastsave-zstd", "save_s"), get(BASE, "save_s")), 1.0),
        check("1.5 GiB: fastsave zstd image / libvirt raw image",
              ratio(get("fastsave-zstd-direct", "image_bytes"), get(RAW, "image_bytes")), 0.5),
        check("1.5 GiB: fastsave zstd image / libvirt lzop image",
              ratio(get("fastsave-zstd-direct", "image_bytes"), get("libvirt-lzop", "image_bytes")),
              1.0, strict=True),
        check("1.5 GiB: fastsave default restore time / libvirt start from its raw image",
              ratio(get(DEFAULT, "restore_s"), get(RAW, "restore_s")), 0.6),
    ]
    rss = [r["fs_rss_kib"] / 1024 for r in scal["rows"] if r["fs_rss_kib"]]
    out.append(check("all guests: fastsave default saving process peak RSS, MiB (max)",
                     max(rss) if rss else None, 128))
    # across sizes of the same content; the idle guest's 12 MB stream never fills the ring
    rss = [r["fs_rss_kib"] / 1024 for r in scal["rows"] if r["fs_rss_kib"] and r["fill_mib"]]
    out.append(check("mixed guests: fastsave default peak RSS spread across sizes, MiB (max - min)",
                     (max(rss) - min(rss)) if len(rss) > 1 else None, 8))
    out.append(check("1.5 GiB: fastsave auto (default) save time / producer limit",
                     ratio(get(DEFAULT, "save_s"), get("limit-producer", "save_s")), 1.2))
    return out


# --------------------------------------------------------------------------- report

def f2(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _range(s: dict[str, Any], key: str) -> str:
    """" [min-max]" when there were several rounds."""
    if s.get(key + "_min") is None or s["rounds"] <= 1:
        return ""
    return f" [{s[key + '_min']:.2f}-{s[key + '_max']:.2f}]"


def contender_table(summ_g: dict[str, Any]) -> list[str]:
    base, raw = summ_g.get(BASE, {}), summ_g.get(RAW, {})
    out = ["| contender | save s | x bypass | call returned at s | restore s | x bypass | image MB | x raw "
           "| saving helper peak RSS MiB | in-process VmHWM growth MiB | machine CPU busy % save/restore "
           "| ok/attempts |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in CONTENDERS:
        s = summ_g.get(c.key)
        if s is None:
            continue
        size = s.get("image_bytes") or s.get("stream_bytes")
        size_txt = f2(size / 1e6 if size else None, ".0f")
        if c.kind in ("producer", "consumer") and size:
            size_txt = f"({size_txt} stream)"
        if s.get("image_apparent_bytes"):
            size_txt += f" (sparse; {s['image_apparent_bytes'] / 1e6:.0f} long)"
        rss = s.get("helper_rss_kib")
        rss_txt = f"{rss / 1024:.1f} ({s['helper_tags']})" if rss else "-"
        inproc = s.get("inproc_hwm_growth_kib")
        spread, rspread = _range(s, "save_s"), _range(s, "restore_s")
        out.append(
            f"| {c.label} | {f2(s.get('save_s'))}{spread} | {f2(ratio(s.get('save_s'), base.get('save_s')))} "
            f"| {f2(s.get('save_returned_s') if c.kind.startswith('libvirt') else None)} "
            f"| {f2(s.get('restore_s'))}{rspread} | {f2(ratio(s.get('restore_s'), base.get('restore_s')))} "
            f"| {size_txt} | {f2(ratio(s.get('image_bytes'), raw.get('image_bytes')), '.3f')} "
            f"| {rss_txt} | {f2(inproc / 1024 if inproc is not None else None, '.1f')} "
            f"| {f2(s['busy_save'] * 100 if s.get('busy_save') is not None else None, '.0f')}/"
            f"{f2(s['busy_restore'] * 100 if s.get('busy_restore') is not None else None, '.0f')} "
            f"| {s['rounds'] - s['failures']}/{s['rounds']} |")
    return out


def phase_table(summ_g: dict[str, Any]) -> list[str]:
    out = ["| contender | save s | prepare | QEMU stream | data durable at | after durable "
           "| of which destroy | QEMU exit | fdatasync after return | restore s | QEMU start | stream in "
           "| helper done at | after stream |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in CONTENDERS:
        s = summ_g.get(c.key)
        if s is None:
            continue
        p = s.get("phases", {})
        out.append(
            f"| {c.label} | {f2(s.get('save_s'))} | {f2(p.get('prepare'))} | {f2(p.get('stream'))} "
            f"| {f2(p.get('durable'))} | {f2(p.get('teardown'))} | {f2(p.get('destroy'))} "
            f"| {f2(p.get('qemu_exit'))} | {f2(p.get('sync'))} | {f2(s.get('restore_s'))} "
            f"| {f2(p.get('r_qemu_start'))} "
            f"| {f2(p.get('r_stream'))} | {f2(p.get('r_read'))} | {f2(p.get('r_after'))} |")
    return out


def stats_table(summ_g: dict[str, Any]) -> list[str]:
    out = ["| contender | op | engine wall s | input_wait s | producer_blocked s | output_wait s "
           "| worker_cpu s | chunks zstd/stored | direct | spliced |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for c in CONTENDERS:
        s = summ_g.get(c.key) or {}
        for which in ("save_stats", "restore_stats"):
            st = s.get(which)
            if not st:
                continue
            out.append(
                f"| {c.label} | {which.split('_')[0]} | {f2(st.get('wall'))} | {f2(st.get('input_wait'))} "
                f"| {f2(st.get('producer_blocked'))} | {f2(st.get('output_wait'))} "
                f"| {f2(st.get('worker_cpu'))} | {f2(st.get('chunks_compressed'), '.0f')}/"
                f"{f2(st.get('chunks_stored'), '.0f')} | {st.get('direct')} | {st.get('spliced')} |")
    return out


def scaling_table(scal: dict[str, Any]) -> list[str]:
    out = ["| guest | RAM GiB | QEMU stream MB | producer limit s | fastsave default save s "
           "| fastsave engine peak RSS MiB | libvirt BYPASS_CACHE save s | libvirt iohelper peak RSS MiB "
           "| libvirt in-process VmHWM growth MiB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in scal["rows"]:
        out.append(
            f"| {r['guest']} | {r['mem_gib']:g} | {f2(r['stream_bytes'] / 1e6 if r['stream_bytes'] else None, '.0f')} "
            f"| {f2(r['producer_s'])} | {f2(r['fs_save_s'])} "
            f"| {f2(r['fs_rss_kib'] / 1024 if r['fs_rss_kib'] else None, '.1f')} | {f2(r['lv_save_s'])} "
            f"| {f2(r['lv_rss_kib'] / 1024 if r['lv_rss_kib'] else None, '.1f')} "
            f"| {f2(r['lv_inproc_kib'] / 1024 if r['lv_inproc_kib'] is not None else None, '.1f')} |")
    sl = scal["slopes"]
    out.append(f"| slope per GiB of RAM (mixed guests, least squares) | | | {f2(sl['producer_s'], '.3f')} s "
               f"| {f2(sl['fs_save_s'], '.3f')} s | {f2(sl['fs_rss_mib'], '.2f')} MiB "
               f"| {f2(sl['lv_save_s'], '.3f')} s | {f2(sl['lv_rss_mib'], '.2f')} MiB | |")
    return out


def floors(data: dict[str, Any], summ: dict[str, Any]) -> list[str]:
    """What no contender can beat on this machine, from this run's own data."""
    s = summ.get(MAIN_GUEST, {})
    prod, base = s.get("limit-producer", {}), s.get(BASE, {})
    raw_mb = (s.get(RAW, {}).get("image_bytes") or 0) / 1e6
    disk = data["meta"].get("disk") or {}
    out = []
    if prod.get("save_s") and base.get("save_s"):
        ph = prod.get("phases", {})
        out.append(
            f"Floors on this machine ({data['guests'][MAIN_GUEST]['label']}): the producer limit "
            f"(pause, QEMU's one migration thread streaming into a pipe read to /dev/null, "
            f"stop) takes {prod['save_s']:.2f} s = {prod['save_s'] / base['save_s']:.2f}x "
            f"libvirt's BYPASS_CACHE save, of which {ph.get('destroy') or 0:.2f} s is "
            "libvirt stopping QEMU (it polls every 200 ms for the process to be gone): a save "
            "that goes through QEMU's migration stream cannot be faster than that. ")
    if disk and raw_mb:
        out[-1:] = [(out[-1] if out else "") +
                    f"The disk with O_DIRECT: write {disk['write_mb_s']:.0f} MB/s, read "
                    f"{disk['read_mb_s']:.0f} MB/s (one sequential stream, measured at the "
                    f"start of the run): writing the {raw_mb:.0f} MB raw stream takes "
                    f"{raw_mb / disk['write_mb_s']:.2f} s, reading it "
                    f"{raw_mb / disk['read_mb_s']:.2f} s."]
    return [line.rstrip() for line in out] + [""] if out else []


def render(data: dict[str, Any], summ: dict[str, Any], scal: dict[str, Any],
           tg: list[dict[str, Any]], png_name: str) -> tuple[str, str]:
    m = data["meta"]
    g = data["guests"]
    head = [
        "# fastsave vs libvirt managed save" + (" (quick run: smoke only)" if m["quick"] else ""),
        "",
        f"{m['date']}, {m['cpus']} CPUs, {m['mem_gib']} GiB RAM, kernel {m['kernel']}, libvirt "
        f"{m.get('libvirt')} (embedded driver), QEMU {m.get('qemu')}, images on {m['fs']} "
        f"({m['work_dir']}); run took {m['duration_s'] / 60:.1f} min"
        + (f" (1-min load average {m['load_avg_start'][0]:.1f} at the start, "
           f"{m['load_avg_end'][0]:.1f} at the end)" if m.get("load_avg_end") else "")
        + (f", {m['os']}" if m.get("os") else "") + ". "
        "Regenerate: `.venv/bin/python benchmarks/compare.py" + "".join(" " + a for a in m.get("args", [])) + "`.",
        "",
        "Each contender saves the running test guest (TCG, RAM partly filled with deterministic "
        "guest-like data: code, text, zeros, noise) and starts it again. The fill is loaded into "
        "RAM once, at the guest's first boot (QEMU `-device loader`), and that guest is saved with "
        "libvirt's plain save; every later start outside the timed steps restores that file with "
        "the XML without the loader, so the timed guests have no loader device and no start "
        "re-reads the fill (a real guest has no such device). Contenders alternate "
        "within every round. Times are medians (range in brackets when there are several rounds); "
        "save = the save call until it returns (the guest is paused, its QEMU gone) and its image "
        "is durable: fastsave syncs before it returns; after libvirt's calls an `fdatasync` of the "
        "image is timed too (\"call returned at\" is when libvirt's call itself returned; its "
        "`libvirt_iohelper` syncs the images it writes, so there the fdatasync finds nothing left; "
        "a sparse save is written by QEMU itself); restore = `dom.create()` (libvirt; "
        "`VIR_DOMAIN_START_BYPASS_CACHE` for the BYPASS_CACHE contender), "
        "`virConnectRestoreParams` (file, parallel.channels; with `VIR_DOMAIN_SAVE_BYPASS_CACHE` "
        "for the parallel BYPASS_CACHE contenders) or `fastsave.start(dom)` until it returns with "
        "the guest running. libvirt's parallel save exists only as a plain save to a file "
        "(`virDomainSaveParams` with image_format \"sparse\" and parallel.channels; libvirt "
        ">= 11.2; no managed form): its image size is what the sparse file occupies on disk. "
        "Contenders this libvirt does not offer are left out of the run (listed below). fastsave's default (no `direct` option) writes with O_DIRECT and reads "
        "through the page cache; `+direct` uses O_DIRECT both ways, `(buffered)` neither. After every restore the guest's boot id must be the one it had before the "
        "save (ok/attempts: a failed round is recorded, then tried once more; medians use the "
        "rounds that passed). Ratios are ratios of medians: times against libvirt BYPASS_CACHE, "
        "sizes against libvirt's raw image. Before each restore the image is synced and dropped "
        "from the page cache (`posix_fadvise(DONTNEED)`), as at a start after a host reboot; "
        "without it libvirt's buffered images would be read back from RAM. Machine CPU busy %: the share of all CPUs busy during the step, ours and "
        "anyone else's (a noise indicator on a shared machine). The gzip contender is not run "
        "on the 4 GiB guest (it alone would take ~5 minutes there).",
        "",
        "Peak RSS of the saving process: for fastsave the engine child (`python -m fastsave.worker`), "
        "for libvirt its helper children (`libvirt_iohelper`, which libvirt 9.0 uses for every save "
        "and which fdatasyncs the image, and the compressor for lzop/gzip): VmHWM sampled every "
        "20 ms from /proc. The embedded libvirt driver runs inside the benchmark's own process, so "
        "its in-process part is shown as that process's VmHWM growth during the save (peak reset "
        "before each save through /proc/self/clear_refs).",
        "",
        "QEMU reaping: libvirt stops a domain by signalling QEMU and polling until its pid is "
        "gone, so every stop waits until the QEMU zombie is reaped. On a host that is the "
        "init's job and takes no time; this machine's pid 1 reaped orphans only after "
        f"{m['init_reap_delay_s']:.2f} s (measured at the start of the run), which would add "
        "that much to every save of every contender. The agent processes that run the "
        "embedded driver therefore run under a small shim that is the subreaper of their "
        "QEMUs and reaps them at once, as an init does (`benchmarks/reaper.py`), for "
        "libvirt's contenders and fastsave's alike."
        if m.get("init_reap_delay_s") is not None else "",
        "",
        "Memory warm-up: this machine is itself a VM that hands freed memory back to its host "
        "(free page reporting), and touching memory that was handed back faults on the host "
        "side: 1.5 GiB took 1-3.5 s to touch after 3 s idle, 0.07 s right after a free. Every "
        "start writes a whole guest's RAM into a new QEMU, so which contender's restore paid "
        "that was a matter of timing (the same restore varied 0.6-2.8 s). Right before each "
        "timed start the agent touches and frees guest RAM + 512 MiB, as a host without such "
        "reporting always has it; the time it took is kept in the JSON (`warm_s`).",
        "",
        "Limits: the producer limit is QEMU migrating the paused guest into a 1 MiB pipe drained "
        "to /dev/null (splice), then the domain destroyed (pause, stream, stop: what any save "
        "must do); the consumer limit is a QEMU started paused with `-incoming defer` "
        "taking the captured stream from memory through a pipe, then resumed.",
        "",
    ]
    left = data.get("skipped") or {}
    if left:
        head += ["Left out on this stack: " + "; ".join(
            f"{BY_KEY[k].label} ({why})" for k, why in left.items()) + ".", ""]
    body: list[str] = []
    targets_block = ["```", *[t["line"] for t in tg], "```", "", *floors(data, summ)]
    main_tables: list[str] = []
    for gkey in data["guests"]:
        if gkey not in summ:
            continue
        title = f"## {g[gkey]['label']} (`{gkey}`), {g[gkey]['rounds']} round(s)"
        tbl = contender_table(summ[gkey])
        body += [title, "", *tbl, ""]
        if gkey == MAIN_GUEST:
            main_tables = [f"### {g[gkey]['label']}, {g[gkey]['rounds']} round(s)", "", *tbl, ""]
            body += [
                "### Where the time goes", "",
                "Medians in seconds. prepare: from the call to QEMU's `migrate` (pause, XML, engine "
                "start); QEMU stream: `migrate` until QEMU reports `completed`; data durable at: "
                "when the engine child / libvirt's helpers exited (image written and synced), "
                "counted from the call; after durable: the rest of the call (rename + directory "
                "fsync, stopping QEMU); destroy: the `virDomainDestroy` inside it (libvirt signals "
                "QEMU, then polls every 200 ms until the pid is gone); QEMU exit: QEMU's process "
                "from exiting (PF_EXITING) to gone (reaped). "
                "Restore: QEMU start = `createXML` of the paused `-incoming defer` domain; stream "
                "in: `migrate-incoming` until `completed`; helper done at: engine child / "
                "iohelper exit, from the call. libvirt's plain restore shows no helper: it hands "
                "QEMU the image file itself; its BYPASS_CACHE restore goes through "
                "`libvirt_iohelper` and a pipe, as fastsave's restore goes through its engine "
                "child and a pipe.", "",
                *phase_table(summ[gkey]), "",
                "fastsave engine Stats (medians):", "", *stats_table(summ[gkey]), "",
            ]
    scal_tbl = scaling_table(scal)
    body += ["## Scaling with guest size", "",
             "fastsave default (auto; O_DIRECT save, page-cache restore) and libvirt BYPASS_CACHE; the idle guest is "
             "shown but not part of the slope.", "", *scal_tbl, ""]
    fails = [r for r in data["rounds"] if not r.get("ok")]
    body += ["## Failures", ""]
    body += ([f"- {r['guest']} round {r['round']} attempt {r.get('attempt', 1)} "
              f"{BY_KEY[r['contender']].label}: {r.get('error')}"
              for r in fails] or ["none"])
    body += ["", f"Chart: `{png_name}`; every round's raw data: `{png_name[:-4]}.json`.", ""]
    md = "\n".join(head + ["## Targets", "", *targets_block, "", *body])
    if png_name[:-4] != "compare":  # one stack's run: its block in the README's section
        rounds = g.get(MAIN_GUEST, {}).get("rounds")
        readme = "\n".join([
            f"### {m.get('os', '?')}: libvirt {m.get('libvirt')}, QEMU {m.get('qemu')}",
            "",
            f"`benchmarks/compare.py{''.join(' ' + a for a in m.get('args', ['--quick'] if m['quick'] else []))}` "
            f"({m['date']}, {m['cpus']} CPUs, "
            f"images on {m['fs']}, {rounds} round(s) per contender, run took "
            f"{m['duration_s'] / 60:.1f} min"
            + (f"; 1-min load average {m['load_avg_start'][0]:.1f} at the start, "
               f"{m['load_avg_end'][0]:.1f} at the end" if m.get("load_avg_end") else "")
            + f"); details in "
            f"`benchmarks/results/{png_name[:-4]}.md`, chart `benchmarks/results/{png_name}`. "
            "Save = until the image is durable; ratios against libvirt BYPASS_CACHE (times) and "
            "libvirt's raw image (sizes).", "",
            *(main_tables[2:] if main_tables else ["(no data for the 1.5 GiB guest)", ""]),
            *([("Left out on this stack: " + "; ".join(f"{BY_KEY[k].label} ({why})"
                                                         for k, why in left.items()) + "."), ""]
              if left else []),
            *([f"Failed rounds: " + "; ".join(f"{BY_KEY[r['contender']].label}: {r.get('error')}"
                                             for r in fails if r["guest"] == MAIN_GUEST), ""]
              if any(r["guest"] == MAIN_GUEST for r in fails) else []),
        ])
        return md, readme
    readme = "\n".join([
        f"Latest full run of `benchmarks/compare.py` ({m['date']}, {m['cpus']} CPUs, libvirt "
        f"{m.get('libvirt')}, QEMU {m.get('qemu')}, images on {m['fs']}); details, the time "
        "breakdown and the other guests in `benchmarks/results/compare.md`. Save and restore "
        "times are medians, ratios against libvirt BYPASS_CACHE (times) and libvirt's raw image "
        "(sizes).", "",
        *main_tables, "### Scaling", "", *scal_tbl, "", "### Targets", "", *targets_block, "",
        "![save, restore, size, RSS](benchmarks/results/compare.png)", ""])
    return md, readme


def plot(data: dict[str, Any], summ: dict[str, Any], scal: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summ.get(MAIN_GUEST, {})
    keys = [k for k in SAVERS if k in s]
    labels = [BY_KEY[k].label.replace(" (default)", "\n(default)").replace(" (buffered)", "\n(buffered)")
              .replace("save_image_format=", "") for k in keys]
    colors = ["tab:green" if k.startswith("fastsave") else "tab:gray" for k in keys]
    colors = ["tab:olive" if k == DEFAULT else col for k, col in zip(keys, colors)]
    fig, axes = plt.subplots(3, 2, figsize=(14, 15))
    title = data["guests"].get(MAIN_GUEST, {}).get("label", MAIN_GUEST)

    def bars(ax: Any, field: str, scale: float, ylabel: str, limit: tuple[str, str] | None) -> None:
        vals = [(s[k].get(field) or 0) * scale for k in keys]
        lo = [v - (s[k].get(field + "_min") or 0) * scale if s[k].get(field + "_min") is not None else 0
              for k, v in zip(keys, vals)]
        hi = [(s[k].get(field + "_max") or 0) * scale - v if s[k].get(field + "_max") is not None else 0
              for k, v in zip(keys, vals)]
        ax.bar(range(len(keys)), vals, color=colors, yerr=[lo, hi], capsize=3)
        ranked = sorted(vals)
        top = None
        if len(ranked) > 2 and ranked[-2] > 0 and ranked[-1] > 3 * ranked[-2]:
            top = ranked[-2] * 1.6  # one outlier (gzip) would flatten the rest: clip it
            ax.set_ylim(0, top)
        for i, v in enumerate(vals):
            txt = f"{v:.2f}" if v < 100 else f"{v:.0f}"
            if top is not None and v > top:
                ax.text(i, top * 0.97, txt + " (clipped)", ha="center", va="top", fontsize=7,
                        rotation=90, color="white")
            else:
                ax.text(i, v, txt, ha="center", va="bottom", fontsize=7)
        if limit and limit[0] in s and s[limit[0]].get(field) is not None:
            lv = s[limit[0]][field] * scale
            ax.axhline(lv, color="tab:red", linestyle="--", linewidth=1)
            ax.text(len(keys) - 0.5, lv, limit[1], color="tab:red", ha="right", va="bottom", fontsize=8)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)

    bars(axes[0][0], "save_s", 1, "save s (median, range)", ("limit-producer", "producer limit"))
    axes[0][0].set_title(f"save time - {title}", fontsize=9)
    bars(axes[0][1], "restore_s", 1, "restore s (median, range)", ("limit-consumer", "consumer limit"))
    axes[0][1].set_title("restore time", fontsize=9)
    bars(axes[1][0], "image_bytes", 1e-6, "image MB", None)
    axes[1][0].set_title("image size", fontsize=9)
    vals = [(s[k].get("helper_rss_kib") or 0) / 1024 for k in keys]
    inproc = [(s[k].get("inproc_hwm_growth_kib") or 0) / 1024 for k in keys]
    ax = axes[1][1]
    ax.bar(range(len(keys)), vals, color=colors, label="saving helper process VmHWM")
    ax.bar(range(len(keys)), inproc, bottom=vals, color="tab:blue", alpha=0.4,
           label="in-process VmHWM growth (libvirt embedded / fastsave caller)")
    ax.axhline(128, color="tab:red", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("MiB")
    ax.set_title("peak RSS of the saving process(es)", fontsize=9)
    ax.legend(fontsize=7)
    rows = [r for r in scal["rows"]]
    mixed = [r for r in rows if r["fill_mib"]]
    ax = axes[2][0]
    for key, lab, col in (("fs_save_s", "fastsave default", "tab:olive"),
                          ("lv_save_s", "libvirt BYPASS_CACHE", "tab:gray"),
                          ("producer_s", "producer limit", "tab:red")):
        pts = [(r["mem_gib"], r[key]) for r in mixed if r[key] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=col, label=lab)
        idle = [(r["mem_gib"], r[key]) for r in rows if not r["fill_mib"] and r[key] is not None]
        if idle:
            ax.plot(*zip(*idle), marker="x", linestyle="none", color=col)
    ax.set_xlabel("guest RAM GiB (x: idle guest)")
    ax.set_ylabel("save s")
    ax.set_title("scaling: save time", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[2][1]
    for key, lab, col in (("fs_rss_kib", "fastsave engine child", "tab:olive"),
                          ("lv_rss_kib", "libvirt iohelper", "tab:gray")):
        pts = [(r["mem_gib"], r[key] / 1024) for r in mixed if r[key]]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=col, label=lab)
    ax.axhline(128, color="tab:red", linestyle="--", linewidth=1, label="128 MiB target")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("guest RAM GiB")
    ax.set_ylabel("peak RSS MiB")
    ax.set_title("scaling: peak RSS of the saving process", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


PART_RE = re.compile(r"<!-- bench:part ([\w.-]+) -->\n(.*?)<!-- bench:part-end \1 -->\n?", re.S)


def update_readme(section: str, part: str = "compare") -> None:
    """Puts `section` into the README's results section as the block named
    `part` (one per results stem: the full run's, one per stack), keeping
    the other blocks; text there without block markers is the full run's."""
    text = README.read_text()
    parts: dict[str, str] = {}
    if MARK_START in text and MARK_END in text:
        pre, rest = text.split(MARK_START, 1)
        inner, post = rest.split(MARK_END, 1)
        loose = PART_RE.sub("", inner).strip()
        if loose:
            parts["compare"] = loose
        parts.update({k: v.strip() for k, v in PART_RE.findall(inner)})
    else:
        pre, post = text.rstrip("\n") + "\n\n## Benchmark results\n\n", "\n"
    parts[part] = section.strip()
    order = sorted(parts, key=lambda k: (k != "compare", k))
    blocks = "\n\n".join(f"<!-- bench:part {k} -->\n{parts[k]}\n<!-- bench:part-end {k} -->"
                           for k in order)
    README.write_text(pre + f"{MARK_START}\n{blocks}\n{MARK_END}" + post)


def write_outputs(data: dict[str, Any], stem: str, readme: bool) -> list[dict[str, Any]]:
    summ = summarize(data)
    scal = scaling(data, summ)
    tg = targets(summ, scal)
    data["summary"], data["scaling"], data["targets"] = summ, scal, tg
    RESULTS.mkdir(exist_ok=True)
    md, section = render(data, summ, scal, tg, f"{stem}.png")
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(md)
    plot(data, summ, scal, RESULTS / f"{stem}.png")
    if readme:
        update_readme(section, stem)
    return tg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 512 MiB and 1.5 GiB guests, one round; writes compare-quick.*")
    ap.add_argument("--rounds", type=int, metavar="N",
                    help="rounds per guest (default: 1 with --quick, else each guest's own)")
    ap.add_argument("--guests", metavar="KEYS",
                    help=f"comma-separated guests to run (of {', '.join(GUESTS)})")
    ap.add_argument("--out-name", metavar="STEM",
                    help="write benchmarks/results/STEM.{md,json,png} (default compare, "
                         "compare-quick with --quick), e.g. compare-debian13")
    ap.add_argument("--readme", action=argparse.BooleanOptionalAction, default=None,
                    help="put the results into README.md's results section (its own block per "
                         "STEM; default: only for a full run and for --out-name)")
    ap.add_argument("--agent", metavar="ROOT", help=argparse.SUPPRESS)
    ap.add_argument("--format", help=argparse.SUPPRESS)
    ap.add_argument("--report-only", metavar="JSON",
                    help="rebuild the tables, chart and README section from a saved JSON")
    args = ap.parse_args()
    if args.agent:
        return agent_main(args.agent, args.format)
    guests = args.guests.split(",") if args.guests else None
    if guests and any(k not in GUESTS for k in guests):
        ap.error(f"--guests: known guests are {', '.join(GUESTS)}")
    if args.report_only:
        data = json.loads(Path(args.report_only).read_text())
        for k in ("summary", "scaling", "targets"):
            data.pop(k, None)
    else:
        if os.geteuid() != 0:
            print("compare.py runs QEMU guests on the embedded libvirt driver: run it as root",
                  file=sys.stderr)
            return 2
        runner = Runner(args.quick, args.rounds, guests)
        data = runner.run()
    stem = args.out_name or ("compare-quick" if data["meta"]["quick"] else "compare")
    readme = args.readme if args.readme is not None else bool(args.out_name) or not data["meta"]["quick"]
    tg = write_outputs(data, stem, readme)
    if not args.report_only:
        runner.say("done")
    print()
    for t in tg:
        print(t["line"])
    print(f"\nwritten: {RESULTS / (stem + '.md')}, .json, .png"
          + (f"; README section in {README}" if readme else ""))
    fails = [r for r in data["rounds"] if not r.get("ok")]
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
