"""The save flow: pause, stream through the engine, commit, stop the domain;
on failure, roll back. Runs under the domain's store lock, with the
operation mark written (see recovery.py for what a dead save leaves).

Order, and what holds if the process dies at each step (the next call's
recovery reads the mark):
  pause -> migrate into the engine's pending file   dies: pending dropped, guest resumed
  QEMU "completed" + engine durable -> commit        dies: image present, guest paused ->
                                                     recovery finishes the save (stops it)
  destroy                                            dies: recovery stops it
  publish (a hard link at libvirt's managed-save     dies: a record without its link means
  path, when this libvirt reads the format)                not published (published.py)
  done: mark cleared
"""

from __future__ import annotations

import contextlib
import os
import time

import libvirt

from . import channels, engine, published, trace, watch
from .errors import FastsaveError
from .store import ImageStore
from .virt import fail, qmp
from .worker import EngineProcess

__all__ = ["save", "roll_back", "finish_save", "cancel_migration", "reconnect", "qemu_gone",
           "destroy", "cause_of"]

FD_NAME = "fastsave"
GONE_WAIT = 5.0        # for libvirt to notice a QEMU whose monitor stopped answering
RECONNECT_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0    # for stopping a saved domain through libvirtd restarts
# QEMU's default bandwidth cap would make a save ~10x slower; 1 TiB/s is "none".
UNLIMITED_BANDWIDTH = 1 << 40


def save(dom: libvirt.virDomain, store: ImageStore, uuid: str, xml: str, was_running: bool,
         comes_back_running: bool, opts: object, direct: bool) -> None:
    """Saves and stops the domain. The engine writes a pending image; it
    becomes the domain's image only once QEMU has reported the whole stream
    sent (a stream cut short by a dying QEMU also ends in EOF, and must never
    pass for a saved state). Clears the operation mark once the outcome is
    settled; keeps it when the domain is left needing recovery."""
    name = dom.name()
    uri = dom.connect().getURI()
    path = store.pending_path(uuid)
    worker: EngineProcess | None = None
    multi: channels.SaveChannels | None = None
    changed: dict[str, bool] = {}
    old_bandwidth = None
    deadline = None if opts.timeout is None else time.monotonic() + opts.timeout  # type: ignore[attr-defined]
    try:
        cpus = min(opts.threads or engine.usable_cpus(), engine.usable_cpus())  # type: ignore[attr-defined]
        n = channels.choose_count(dom, getattr(opts, "channels", None), cpus)
        watch.check_abort()
        if was_running:
            dom.suspend()
        old_bandwidth = (qmp(dom, "query-migrate-parameters") or {}).get("max-bandwidth")
        qmp(dom, "migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH})
        if n > 1:  # QEMU's multifd: main + n channels, accepted from QEMU only
            multi = channels.SaveChannels(dom, n)
            try:
                multi.start()
            finally:
                changed = multi.changed
            in_fds = multi.accept(check=lambda: channels.check_migration(dom, "migration"))
            w = -1
        else:
            changed = channels.pin_stream(channels.qmp_call(dom), 0)
            r, w = os.pipe2(os.O_CLOEXEC)
            in_fds = [r]
        try:
            worker = EngineProcess.save(
                in_fds if multi else in_fds[0], path, opts.progress,  # type: ignore[attr-defined]
                opts.engine_options(direct),  # type: ignore[attr-defined]
                xml=xml, name=name, uuid=uuid, was_running=comes_back_running)
        finally:
            for fd in in_fds:
                os.close(fd)
        if w >= 0:
            try:
                qmp(dom, "getfd", {"fdname": FD_NAME}, fds=[w])
            finally:
                os.close(w)
            qmp(dom, "migrate", {"uri": f"fd:{FD_NAME}"})
        trace.emit("save.migrating", name)
        watch.wait_migration(dom, worker, "migration", stall_timeout=opts.stall_timeout,  # type: ignore[attr-defined]
                             deadline=deadline)
        trace.emit("save.streamed", name)
        stats = worker.result(timeout=watch.WORKER_GRACE)
        store.commit_pending(uuid)
        trace.emit("save.committed", name, stats=stats)
    except BaseException as e:
        cause = cause_of(e, worker)
        state, settled = roll_back(dom, worker, was_running, old_bandwidth, uri, uuid)
        if multi is not None:
            multi.close()
        if changed:  # after the cancel: QEMU refuses it during a migration
            channels.unpin(channels.qmp_call(dom), changed)
        if settled:
            with contextlib.suppress(OSError):
                store.clear_saving_mark(uuid)
        raise fail(libvirt.VIR_ERR_OPERATION_FAILED,
                   f"managed save of domain {name} failed: {cause}; no image was kept and {state}"
                   ) from e
    finish_save(dom, uri, uuid, name, store.image_path(uuid))
    trace.emit("save.stopped", name)
    published.publish(dom, store, uuid)
    store.clear_saving_mark(uuid)


def finish_save(dom: libvirt.virDomain, uri: str, uuid: str, name: str, image: str) -> None:
    """Stops a domain whose image is committed. Retries through libvirtd
    restarts; a domain that is already down (or gone) is done. If it cannot
    be stopped, the error says that a good image exists; the caller keeps
    the operation mark, so the next call on the domain stops it."""
    err = destroy(dom, uri, uuid, STOP_TIMEOUT)
    if err is not None:
        raise fail(libvirt.VIR_ERR_OPERATION_FAILED,
                   f"domain {name} is saved (its image {image} is complete and durable), but "
                   f"stopping it failed: {err}; it is left paused, and the next fastsave call "
                   f"on it (e.g. 'fastsave has {name}') stops it")


def destroy(dom: libvirt.virDomain, uri: str, uuid: str, timeout: float) -> str | None:
    """Destroys the domain's QEMU, reconnecting when libvirtd restarts; None
    once it is down, else the last error's text."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            dom = reconnect(dom, uri, uuid) if uri else dom
            if not dom.isActive():
                return None
            dom.destroy()
            return None
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None  # undefined and stopped meanwhile
            with contextlib.suppress(libvirt.libvirtError):
                if not dom.isActive():
                    return None
            if time.monotonic() > deadline:
                return str(e)
            time.sleep(0.5)


def cause_of(e: BaseException, worker: EngineProcess | None) -> str:
    """The engine's own error explains a failure better than QEMU's broken pipe."""
    if worker is not None:
        try:
            worker.result(timeout=10)
        except (OSError, FastsaveError, ValueError, MemoryError) as inner:
            if str(inner) != str(e):
                return f"{inner} ({e})"
        except Exception:  # noqa: BLE001 - still running: the outer error is the cause
            pass
    return str(e) or type(e).__name__


def reconnect(dom: libvirt.virDomain, uri: str, uuid: str) -> libvirt.virDomain:
    """The same domain through a live connection: if libvirtd restarted under
    us, wait for it to come back (QEMU keeps running meanwhile)."""
    try:
        dom.isActive()
        return dom
    except libvirt.libvirtError:
        pass
    deadline = time.monotonic() + RECONNECT_TIMEOUT
    while True:
        try:
            return libvirt.open(uri).lookupByUUIDString(uuid)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def roll_back(dom: libvirt.virDomain, worker: EngineProcess | None, was_running: bool,
              old_bandwidth: object, uri: str = "", uuid: str = "") -> tuple[str, bool]:
    """Stops the save and puts the domain back as it was. Returns how it was
    left, and whether that is settled (False: a later recovery must finish)."""
    if uri:
        with contextlib.suppress(libvirt.libvirtError):
            dom = reconnect(dom, uri, uuid)
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            qmp(dom, "migrate_cancel")  # first: the engine's death must not look like the end
    if worker is not None:
        worker.kill()
        with contextlib.suppress(Exception):
            worker.result(timeout=30)
    gone = "the domain is no longer running (its QEMU process is gone)"
    try:
        if qemu_gone(dom):
            return gone, True
        if old_bandwidth is not None:
            with contextlib.suppress(libvirt.libvirtError):
                qmp(dom, "migrate-set-parameters", {"max-bandwidth": old_bandwidth})
        cancel_migration(dom)
        state = dom.state()[0]
        if was_running and state == libvirt.VIR_DOMAIN_PAUSED:
            dom.resume()
            return "the domain is running again", True
        if state == libvirt.VIR_DOMAIN_PAUSED:
            return "the domain is paused, as it was", True
        if state == libvirt.VIR_DOMAIN_RUNNING:
            return "the domain is running", True
        if qemu_gone(dom):
            return gone, True
        return f"the domain is in state {state}", False
    except libvirt.libvirtError as e:
        if qemu_gone(dom):  # QEMU died between the check and the resume
            return gone, True
        return (f"the domain could not be resumed: {e}; the next fastsave call on it "
                f"tries again"), False


def cancel_migration(dom: libvirt.virDomain, timeout: float = 30.0) -> None:
    """Cancels QEMU's outgoing migration, if any, and waits until it is over:
    QEMU refuses 'cont' until then."""
    with contextlib.suppress(libvirt.libvirtError):
        qmp(dom, "migrate_cancel")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = (qmp(dom, "query-migrate") or {}).get("status")
        if status not in ("setup", "active", "device", "pre-switchover", "cancelling"):
            return
        time.sleep(watch.POLL)


def qemu_gone(dom: libvirt.virDomain) -> bool:
    """True if the domain's QEMU is dead. libvirt learns of a killed QEMU
    asynchronously, so a monitor that no longer answers means waiting a
    moment for libvirt to mark the domain shut off."""
    try:
        if not dom.isActive():
            return True
        qmp(dom, "query-status")
        return False
    except libvirt.libvirtError:
        pass
    deadline = time.monotonic() + GONE_WAIT
    while time.monotonic() < deadline:
        with contextlib.suppress(libvirt.libvirtError):
            if not dom.isActive():
                return True
        time.sleep(watch.POLL)
    return False
