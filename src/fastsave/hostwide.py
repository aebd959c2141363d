"""Host-wide save and restore: every domain at once, in bounded parallel, and
what the host does at shutdown and boot (as libvirt-guests does, faster).

libvirt-guests saves guests one at a time; a dense host going down wants them
all saved in the time the disk allows. `save_all` runs managed saves side by
side (a scheduler bounds how many), keeps going past a domain that fails, and
at a deadline applies the chosen action to the domains not yet started. With
`on_shutdown="shutdown"` it powers guests off through ACPI instead, waiting
for them up to the deadline. With `record=True` (the systemd unit at host
shutdown) it first records which guests were running, in the image store;
`restore_all(boot=True)` (the unit at boot) starts exactly those again, from
their saved state where they have one, plus the autostart domains that have
a saved state, then removes the record.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import stat
import threading
import time
import uuid as uuid_mod
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import libvirt

from . import engine
from .engine import usable_cpus
from .managed import Options, image_store, managed_save, start
from .store import ImageStore

__all__ = ["DomainResult", "BulkReport", "save_all", "restore_all", "autostart", "default_parallel",
           "TimeoutAction", "OnShutdown", "OnBoot", "RECORD_NAME", "read_record"]

TimeoutAction = Literal["leave", "shutdown", "destroy", "save"]
OnShutdown = Literal["save", "shutdown"]
OnBoot = Literal["start", "ignore"]
MAX_DEFAULT_PARALLEL = 16
# The guests running when the host went down, in the store they were saved
# to (libvirt-guests keeps the same list in /var/lib/libvirt/libvirt-guests).
RECORD_NAME = ".running-guests"
POLL_S = 0.25


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
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.results)

    @property
    def mb_per_s(self) -> float:
        return self.total_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def default_parallel(n_domains: int) -> int:
    """A save spends most of its time waiting: on QEMU's migration thread, on
    the disk, and on the kernel tearing down the guest's memory. Measured here
    (2 cores, 4 guests): 2 at once took 0.65x the serial time, 4 at once 0.36x;
    6 guests of 1 GiB: 4 at once (two waves) took 1.2-2x the time of all 6 at
    once, saving and restoring. So: twice the cores, at least 8, at most
    MAX_DEFAULT_PARALLEL."""
    return max(1, min(n_domains, max(8, 2 * usable_cpus()), MAX_DEFAULT_PARALLEL))


def _threads_each(opts: Options, parallel: int) -> int:
    """Compression threads per save, so that all saves together use the cores."""
    return opts.threads or max(1, usable_cpus() // max(parallel, 1))


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


class _Unfinished(Exception):
    """A domain's job ended without its goal (left running, destroyed): the
    message is the domain's error, as is."""


def _run(doms: list[libvirt.virDomain], job: Callable[[libvirt.virDomain, DomainResult], None],
         parallel: int | None, deadline: float | None,
         late: Callable[[libvirt.virDomain, DomainResult], None] | None,
         on_start: Callable[[list[DomainResult]], None] | None) -> BulkReport:
    """Runs `job` on every domain, `parallel` at once; a domain whose turn
    comes after `deadline` gets `late` instead."""
    t0 = time.monotonic()
    results = [DomainResult(d.name(), d.UUIDString(), expected_bytes=_mem_bytes(d)) for d in doms]
    if on_start is not None:
        on_start(results)
    lock = threading.Lock()

    def one(i: int) -> None:
        d, r = doms[i], results[i]
        run = job
        if deadline is not None and time.monotonic() > deadline and late is not None:
            run = late
        t = time.monotonic()
        try:
            run(d, r)
            r.ok = True
        except _Unfinished as e:
            r.error = str(e)
        except libvirt.libvirtError as e:
            r.error = str(e)
        except Exception as e:  # noqa: BLE001 - one domain's failure must not stop the rest
            r.error = f"{type(e).__name__}: {e}"
        finally:
            with lock:
                r.seconds = time.monotonic() - t

    n = parallel or default_parallel(len(doms))
    with ThreadPoolExecutor(max_workers=max(1, n), thread_name_prefix="fastsave-hostwide") as pool:
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


def _wait_off(d: libvirt.virDomain, until: float) -> bool:
    """Waits for the domain to stop running; True if it did by `until`."""
    while True:
        try:
            if not d.isActive():
                return True
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return True  # a transient domain is gone once off
            raise
        if time.monotonic() >= until:
            return False
        time.sleep(min(POLL_S, max(0.0, until - time.monotonic())))


# -- the record of running guests

def _write_record(store: ImageStore, text: str) -> None:
    store.write_small(RECORD_NAME, text)
    os.fsync(store.fd)  # the record must survive the power-off that follows


def read_record(store: ImageStore) -> tuple[list[str], str | None]:
    """The UUIDs the record lists, in the order they were running, and a
    warning when a record exists but cannot be used (then: no UUIDs)."""
    where = os.path.join(store.directory, RECORD_NAME)
    try:
        fd = os.open(RECORD_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=store.fd)
    except FileNotFoundError:
        return [], None
    except OSError as e:
        return [], f"cannot read {where}: {e.strerror}; ignoring it"
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return [], (f"{where} is not a private regular file of this user "
                        f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); ignoring it")
        try:
            data = json.loads(f.read(1 << 20).decode("utf-8"))
            guests = [str(uuid_mod.UUID(u)) for u in data["guests"]]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return [], f"{where} is not a valid record ({e}); ignoring it"
    return guests, None


def _record_running(store: ImageStore, conn: libvirt.virConnect, doms: list[libvirt.virDomain]) -> None:
    """Adds these domains to the record, keeping what an earlier save-all
    recorded that no boot has processed yet (a second shutdown run must not
    forget the guests the first one stopped)."""
    old, _ = read_record(store)
    merged = old + [u for u in (d.UUIDString() for d in doms) if u not in old]
    if not merged:
        return
    _write_record(store, json.dumps({"uri": conn.getURI(), "recorded": time.time(),
                                     "guests": merged}) + "\n")


def _remove_record(store: ImageStore) -> None:
    try:
        os.unlink(RECORD_NAME, dir_fd=store.fd)
    except FileNotFoundError:
        return
    os.fsync(store.fd)


# -- host shutdown

def save_all(conn: libvirt.virConnect, *, names: list[str] | None = None, match: str | None = None,
             parallel: int | None = None, timeout: float | None = None,
             on_timeout: TimeoutAction | None = None, on_shutdown: OnShutdown = "save",
             record: bool = False, flags: int = 0, options: Options | None = None,
             on_start: Callable[[list[DomainResult]], None] | None = None) -> BulkReport:
    """Stops every running or paused persistent domain (or those named or
    matching a shell pattern) concurrently; returns one result per domain.

    on_shutdown="save" (default): managed-saves them. `timeout` seconds is
    the deadline for a save to *start*; a domain whose turn comes later gets
    `on_timeout`: "leave" (default) running, "destroy", or "shutdown" (an
    ACPI power-off request, then up to `timeout` seconds more for it to power
    off, then destroy).

    on_shutdown="shutdown": sends each an ACPI power-off request and waits up
    to `timeout` seconds (None or 0: no limit) for all to power off; the
    ones still running then get `on_timeout`: "save" (default: a guest that
    ignores ACPI still holds its users' work, and it is back at boot),
    "destroy" or "leave". `parallel` bounds the guests shutting down at once
    (default: all).

    record=True first adds the domains to the store's record of running
    guests, which `restore_all(boot=True)` reads at the next boot.
    """
    if on_shutdown not in ("save", "shutdown"):
        raise ValueError(f"on_shutdown must be save or shutdown, not {on_shutdown!r}")
    allowed = ("leave", "shutdown", "destroy") if on_shutdown == "save" else ("save", "destroy", "leave")
    on_timeout = on_timeout or allowed[0]
    if on_timeout not in allowed:
        raise ValueError(f"with on_shutdown={on_shutdown}, on_timeout must be one of "
                         f"{', '.join(allowed)}, not {on_timeout!r}")
    opts = options or Options()
    doms = _select(conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
                                       | libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT), names, match)
    deadline = time.monotonic() + timeout if timeout else None
    with image_store(conn, opts.image_dir) as store:
        image_path = store.image_path
        if record:  # before any guest stops: a run cut short still leaves the record
            _record_running(store, conn, doms)

    n_saves = parallel or default_parallel(len(doms))
    per_save_threads = _threads_each(opts, n_saves)

    def save(d: libvirt.virDomain, r: DomainResult) -> None:
        o = dataclasses.replace(opts, threads=per_save_threads, progress=_track(r, opts.progress))
        managed_save(d, flags, options=o)
        r.action = "saved"
        r.bytes = r.progress.bytes_in if r.progress else 0
        r.image_bytes = os.path.getsize(image_path(d.UUIDString()))

    if on_shutdown == "save":
        def late(d: libvirt.virDomain, r: DomainResult) -> None:
            why = "deadline passed before its save could start"
            if on_timeout == "destroy":
                d.destroy()
                r.action = "destroyed"
            elif on_timeout == "shutdown":
                d.shutdown()
                if _wait_off(d, time.monotonic() + (timeout or 0)):
                    r.action = "shut down"
                else:
                    d.destroy()
                    r.action = "destroyed"
                    why += f"; it did not power off within {timeout:g} s of the ACPI request"
            else:
                r.action = "left running"
            raise _Unfinished(f"{why}; {r.action}")

        return _run(doms, save, n_saves, deadline, late, on_start)

    save_slots = threading.BoundedSemaphore(n_saves)

    def leftover(d: libvirt.virDomain, r: DomainResult, why: str) -> None:
        if on_timeout == "save":
            with save_slots:
                save(d, r)
            r.action = "saved (did not power off)"
            return
        if on_timeout == "destroy":
            d.destroy()
            r.action = "destroyed"
        else:
            r.action = "left running"
        raise _Unfinished(f"{why}; {r.action}")

    def power_off(d: libvirt.virDomain, r: DomainResult) -> None:
        d.shutdown()
        if _wait_off(d, deadline if deadline is not None else float("inf")):
            r.action = "shut down"
            return
        leftover(d, r, f"did not power off within {timeout:g} s of the ACPI request")

    def late_off(d: libvirt.virDomain, r: DomainResult) -> None:
        leftover(d, r, "deadline passed before its shutdown could start")

    return _run(doms, power_off, parallel or max(1, len(doms)), deadline, late_off, on_start)


# -- host boot

def restore_all(conn: libvirt.virConnect, *, include_all: bool = False,
                names: list[str] | None = None, match: str | None = None,
                parallel: int | None = None, flags: int = 0, options: Options | None = None,
                on_start: Callable[[list[DomainResult]], None] | None = None,
                boot: bool = False, on_boot: OnBoot = "start",
                start_delay: float = 0.0) -> BulkReport:
    """Starts shut-off domains from their saved state.

    Named or matching domains: those of them that have a saved state.
    Otherwise the autostart domains that have one (every domain that has one
    with `include_all`) and, with `boot`, every domain in the record of
    guests running at the last host shutdown (see save_all(record=True)),
    first and in their order: from its saved state where it has one, else
    by a normal boot, as libvirt-guests does. A recorded domain already
    running is left alone. `boot` removes the record afterwards, whatever
    happened (a domain whose restore failed keeps its image).

    on_boot="ignore" starts nothing (images stay); `start_delay` seconds
    separate the beginnings of two starts, as libvirt-guests' START_DELAY.
    """
    if on_boot not in ("start", "ignore"):
        raise ValueError(f"on_boot must be start or ignore, not {on_boot!r}")
    t0 = time.monotonic()
    opts = options or Options()
    warnings: list[str] = []
    with image_store(conn, opts.image_dir) as store:
        saved = {u for u, _ in store.list_images()}
        recorded: list[str] = []
        if boot:
            recorded, problem = read_record(store)
            if problem:
                warnings.append(problem)
        if on_boot == "ignore":
            if boot:
                _remove_record(store)
            warnings.append("configured not to start any guests on boot (ON_BOOT=ignore); "
                            "saved states are kept")
            return BulkReport([], time.monotonic() - t0, warnings)
        image_path = store.image_path

    persistent = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT)
    if names or match:
        chosen = [d for d in _select(persistent, names, match)
                  if d.UUIDString() in saved and not d.isActive()]
    else:
        by_uuid = {d.UUIDString(): d for d in persistent}
        chosen = []
        for u in recorded:
            if u in by_uuid:
                chosen.append(by_uuid[u])
            else:
                warnings.append(f"domain {u} was running at shutdown but is no longer defined")
        chosen += [d for d in _select(persistent, None, None)
                   if d.UUIDString() not in recorded and d.UUIDString() in saved
                   and not d.isActive() and (include_all or d.autostart())]
    n = parallel or default_parallel(len(chosen))
    per_threads = _threads_each(opts, n)
    if opts.direct is None and min(n, len(chosen)) > 1:
        # Several restores at once keep the disk busy without the kernel's
        # readahead, and reading through the page cache would hold a second
        # copy of every guest's memory while the host boots (6 guests of 1 GiB
        # here: 7.2 s with O_DIRECT reads, 10.8 s through the cache).
        opts = dataclasses.replace(opts, direct=True)
    pace = threading.Lock()
    next_start = [0.0]

    def job(d: libvirt.virDomain, r: DomainResult) -> None:
        if d.isActive():
            r.action = "already running"
            return
        with pace:  # START_DELAY: the starts begin at least this far apart
            wait = next_start[0] - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            next_start[0] = time.monotonic() + start_delay
        uuid = d.UUIDString()
        path = image_path(uuid)
        had_state = uuid in saved
        r.image_bytes = os.path.getsize(path) if had_state and os.path.exists(path) else 0
        o = dataclasses.replace(opts, threads=per_threads, progress=_track(r, opts.progress))
        start(d, flags, options=o)
        r.action = "restored" if had_state else "started"
        r.bytes = r.progress.bytes_out if r.progress else 0

    try:
        report = _run(chosen, job, n, None, None, on_start)
    finally:
        if boot:
            with image_store(conn, opts.image_dir) as store:
                _remove_record(store)
    report.warnings[:0] = warnings
    report.seconds = time.monotonic() - t0
    return report


def autostart(conn: libvirt.virConnect, *, include_all: bool = False,
              options: Options | None = None) -> list[tuple[str, str | None]]:
    """Host boot: restores every shut-off autostart domain that has a saved
    state (every such domain with include_all), in bounded parallel.
    Returns (name, error message or None) for each domain it tried."""
    report = restore_all(conn, include_all=include_all, options=options)
    return [(r.name, None if r.ok else r.error) for r in report.results]
