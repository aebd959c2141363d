"""Whole-host save and restore: every domain at once, in bounded parallel.

libvirt-guests saves guests one at a time; a dense host going down wants them
all saved in the time the disk allows. `save_all` runs managed saves side by
side (a scheduler bounds how many), keeps going past a domain that fails,
and at a deadline applies libvirt-guests' choice to the domains not yet
started: leave them running, shut them down, or destroy them. `restore_all`
is the boot-time counterpart.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import libvirt

from . import engine
from .managed import Options, image_store, managed_save, start

__all__ = ["DomainResult", "BulkReport", "save_all", "restore_all", "autostart", "default_parallel",
           "TimeoutAction"]

TimeoutAction = Literal["leave", "shutdown", "destroy"]
MAX_DEFAULT_PARALLEL = 16


@dataclasses.dataclass
class DomainResult:
    name: str
    uuid: str
    ok: bool = False
    error: str | None = None
    seconds: float = 0.0
    bytes: int = 0               # stream bytes moved
    image_bytes: int = 0
    action: str = ""             # what happened: saved, restored, skipped, shutdown, ...
    progress: engine.Stats | None = dataclasses.field(default=None, repr=False)
    expected_bytes: int = 0      # guest memory, for progress estimates


@dataclasses.dataclass
class BulkReport:
    results: list[DomainResult]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.results)

    @property
    def mb_per_s(self) -> float:
        return self.total_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_parallel(n_domains: int) -> int:
    """A save spends most of its time waiting: on QEMU's migration thread, on
    the disk, and on the kernel tearing down the guest's memory. Measured here
    (2 cores, 4 guests): 2 at once took 0.65x the serial time, 4 at once 0.36x.
    So: twice the cores, at least 4, at most MAX_DEFAULT_PARALLEL."""
    return max(1, min(n_domains, max(4, 2 * _cores()), MAX_DEFAULT_PARALLEL))


def _threads_each(opts: Options, parallel: int) -> int:
    """Compression threads per save, so that all saves together use the cores."""
    return opts.threads or max(1, _cores() // max(parallel, 1))


def _select(doms: Iterable[libvirt.virDomain], names: list[str] | None,
            match: str | None) -> list[libvirt.virDomain]:
    out = []
    for d in doms:
        n = d.name()
        if names and n not in names and d.UUIDString() not in names:
            continue
        if match and not fnmatch.fnmatch(n, match):
            continue
        out.append(d)
    return sorted(out, key=lambda d: d.name())


def _run(doms: list[libvirt.virDomain], job: Callable[[libvirt.virDomain, DomainResult], None],
         parallel: int | None, deadline: float | None,
         late: Callable[[libvirt.virDomain, DomainResult], None] | None,
         on_start: Callable[[list[DomainResult]], None] | None) -> BulkReport:
    t0 = time.monotonic()
    results = [DomainResult(d.name(), d.UUIDString(), expected_bytes=_mem_bytes(d)) for d in doms]
    if on_start is not None:
        on_start(results)
    lock = threading.Lock()

    def one(i: int) -> None:
        d, r = doms[i], results[i]
        if deadline is not None and time.monotonic() > deadline:
            if late is not None:
                late(d, r)
            return
        t = time.monotonic()
        try:
            job(d, r)
            r.ok = True
        except libvirt.libvirtError as e:
            r.error = str(e)
        except Exception as e:  # noqa: BLE001 - one domain's failure must not stop the rest
            r.error = f"{type(e).__name__}: {e}"
        finally:
            with lock:
                r.seconds = time.monotonic() - t

    n = parallel or default_parallel(len(doms))
    with ThreadPoolExecutor(max_workers=max(1, n), thread_name_prefix="fastsave-bulk") as pool:
        list(pool.map(one, range(len(doms))))
    return BulkReport(results, time.monotonic() - t0)


def _mem_bytes(d: libvirt.virDomain) -> int:
    try:
        return int(d.info()[2]) * 1024
    except libvirt.libvirtError:
        return 0


def _track(r: DomainResult, user: Callable[[engine.Stats], None] | None) -> Callable[[engine.Stats], None]:
    def cb(s: engine.Stats) -> None:
        r.progress = s
        if user is not None:
            user(s)
    return cb


def save_all(conn: libvirt.virConnect, *, names: list[str] | None = None, match: str | None = None,
             parallel: int | None = None, timeout: float | None = None,
             on_timeout: TimeoutAction = "leave", flags: int = 0,
             options: Options | None = None,
             on_start: Callable[[list[DomainResult]], None] | None = None) -> BulkReport:
    """Managed-saves every running or paused persistent domain (or those named
    or matching a shell pattern) concurrently; returns one result per domain."""
    opts = options or Options()
    doms = _select(conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
                                       | libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT), names, match)
    n = parallel or default_parallel(len(doms))
    per_save_threads = _threads_each(opts, n)
    deadline = time.monotonic() + timeout if timeout else None
    with image_store(conn, opts.image_dir) as store:
        image_path = store.image_path

    def job(d: libvirt.virDomain, r: DomainResult) -> None:
        o = dataclasses.replace(opts, threads=per_save_threads, progress=_track(r, opts.progress))
        managed_save(d, flags, options=o)
        r.action = "saved"
        r.bytes = r.progress.bytes_in if r.progress else 0
        r.image_bytes = os.path.getsize(image_path(d.UUIDString()))

    def late(d: libvirt.virDomain, r: DomainResult) -> None:
        r.error = "deadline passed before its save could start"
        try:
            if on_timeout == "shutdown":
                d.shutdown()
                r.action = "shutdown"
            elif on_timeout == "destroy":
                d.destroy()
                r.action = "destroyed"
            else:
                r.action = "left running"
        except libvirt.libvirtError as e:
            r.error += f"; {on_timeout} failed: {e}"

    return _run(doms, job, n, deadline, late, on_start)


def restore_all(conn: libvirt.virConnect, *, include_all: bool = False,
                names: list[str] | None = None, match: str | None = None,
                parallel: int | None = None, flags: int = 0, options: Options | None = None,
                on_start: Callable[[list[DomainResult]], None] | None = None) -> BulkReport:
    """Starts, from their saved state, the shut-off domains that have one:
    autostart domains only, unless `include_all` or names/match select others."""
    opts = options or Options()
    with image_store(conn, opts.image_dir) as store:
        saved = {u for u, _ in store.list_images()}
    inactive = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE
                                   | libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT)
    chosen = [d for d in _select(inactive, names, match) if d.UUIDString() in saved
              and (include_all or names or match or d.autostart())]
    n = parallel or default_parallel(len(chosen))
    per_threads = _threads_each(opts, n)

    def job(d: libvirt.virDomain, r: DomainResult) -> None:
        path = store.image_path(d.UUIDString())
        r.image_bytes = os.path.getsize(path) if os.path.exists(path) else 0
        o = dataclasses.replace(opts, threads=per_threads, progress=_track(r, opts.progress))
        start(d, flags, options=o)
        r.action = "restored"
        r.bytes = r.progress.bytes_out if r.progress else 0

    return _run(chosen, job, n, None, None, on_start)


def autostart(conn: libvirt.virConnect, *, include_all: bool = False,
              options: Options | None = None) -> list[tuple[str, str | None]]:
    """Host boot: restores every shut-off autostart domain that has a saved
    state (every such domain with include_all), in bounded parallel.
    Returns (name, error message or None) for each domain it tried."""
    report = restore_all(conn, include_all=include_all, options=options)
    return [(r.name, None if r.ok else r.error) for r in report.results]
