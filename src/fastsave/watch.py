"""Bounded waits on QEMU's migration and the engine child.

Every wait in a save or a restore ends: when QEMU reports the migration over,
when the engine fails, when no byte has moved for `stall_timeout` seconds
(a stuck engine, disk or QEMU), past the caller's overall `timeout`, or when
the process is asked to stop (SIGTERM/SIGHUP in the command: `abort()`). The
caller then rolls back.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import libvirt

from .errors import FastsaveError
from .virt import qmp
from .worker import EngineProcess

__all__ = ["Aborted", "abort", "aborting", "reset_abort", "wait_migration", "POLL", "WORKER_GRACE"]

POLL = 0.02
WORKER_GRACE = 60.0  # for QEMU to finish once the engine is done, and vice versa

_abort = threading.Event()
_abort_reason = ["stop requested"]


class Aborted(FastsaveError):
    """The process was asked to stop (a signal) while a save or restore ran."""


def abort(reason: str) -> None:
    """Makes every save and restore of this process stop and roll back."""
    _abort_reason[0] = reason
    _abort.set()


def aborting() -> bool:
    return _abort.is_set()


def reset_abort() -> None:
    _abort.clear()


def check_abort() -> None:
    if _abort.is_set():
        raise Aborted(f"stopped: {_abort_reason[0]}")


def wait_migration(dom: libvirt.virDomain, worker: EngineProcess, what: str, *,
                   stall_timeout: float, deadline: float | None) -> None:
    """Polls QEMU until its migration completes; raises with the engine's or
    QEMU's reason, or because nothing moved for `stall_timeout` seconds, or
    past `deadline` (time.monotonic()). A failed engine ends the wait at once
    (QEMU may sit on a cut stream)."""
    started = time.monotonic()
    grace_until = None
    while True:
        check_abort()
        info: dict[str, Any] = qmp(dom, "query-migrate") or {}
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise FastsaveError(f"QEMU {what} {status}: {info.get('error-desc', 'no reason given')}")
        now = time.monotonic()
        if not worker.running():
            worker.result(timeout=WORKER_GRACE)  # raises the engine's error, if it had one
            if grace_until is None:
                grace_until = now + WORKER_GRACE
            elif now > grace_until:
                raise FastsaveError(f"QEMU {what} still {status!r} {WORKER_GRACE:.0f} s after "
                                    "the engine finished the stream")
        elif now - max(started, worker.last_advance) > stall_timeout:
            raise FastsaveError(f"{what} stalled: no data moved for {stall_timeout:g} s "
                                f"(QEMU status {status!r})")
        if deadline is not None and now > deadline:
            raise FastsaveError(f"{what} did not finish within its time limit")
        time.sleep(POLL)
