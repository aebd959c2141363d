"""Phase timestamps of saves and restores, for whoever measures them.

A callback registered with `add` is called as

    callback(event, domain, when, details)

at each phase boundary of a managed save or restore in this process: `event`
is one of EVENTS, `domain` the domain's name, `when` is `time.monotonic()`
at the boundary and `details` a dict (empty unless the event says otherwise).
Callbacks run in the saving thread, in the order they were added, and should
return quickly. A callback that raises never breaks the save or restore: the
error is logged once per callback (logger "fastsave.trace") and ignored.
With no callback registered `emit` does nothing.

Events (in the order they happen):

    save.migrating        QEMU's `migrate` into the engine's pipe was accepted
    save.streamed         QEMU reported the migration completed
    save.committed        the image is durable under its final name; details:
                          stats (the engine's engine.Stats)
    save.stopped          the domain's QEMU is stopped: the save is done
    restore.qemu-starting just before libvirt starts QEMU with -incoming defer
    restore.qemu-started  QEMU runs (paused), waiting for the stream
    restore.incoming      QEMU's `migrate-incoming` from the engine's pipe was accepted
    restore.streamed      QEMU reported the incoming migration completed
    restore.done          the image is removed and the guest resumed as asked;
                          details: stats (the engine's engine.Stats)
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

__all__ = ["EVENTS", "Callback", "add", "remove", "emit"]

EVENTS = (
    "save.migrating", "save.streamed", "save.committed", "save.stopped",
    "restore.qemu-starting", "restore.qemu-started", "restore.incoming", "restore.streamed",
    "restore.done",
)

Callback = Callable[[str, str, float, "dict[str, Any]"], object]

log = logging.getLogger("fastsave.trace")
_lock = threading.Lock()
_callbacks: tuple[Callback, ...] = ()  # replaced, never changed: emit reads it without the lock
_reported: set[int] = set()            # id() of callbacks whose failure was logged


def add(callback: Callback) -> None:
    """Calls `callback` at every event from now on (once, however often added)."""
    global _callbacks
    with _lock:
        if callback not in _callbacks:
            _callbacks = (*_callbacks, callback)


def remove(callback: Callback) -> None:
    """Stops calling `callback`; no error if it was not added."""
    global _callbacks
    with _lock:
        _callbacks = tuple(c for c in _callbacks if c != callback)
        _reported.discard(id(callback))


def emit(event: str, domain: str, **details: Any) -> None:
    """Tells every callback that `event` happened now to `domain`."""
    callbacks = _callbacks
    if not callbacks:
        return
    when = time.monotonic()
    for callback in callbacks:
        try:
            callback(event, domain, when, details)
        except Exception:  # noqa: BLE001 - a measuring hook must not break a save
            if id(callback) not in _reported:
                _reported.add(id(callback))
                log.warning("trace callback %r failed at %s of domain %s; its later failures "
                            "are not logged", callback, event, domain, exc_info=True)
