"""Managed save for libvirt QEMU domains: the system keeps a domain's saved
state, restores it when the domain starts again, and never keeps it once the
domain runs.

    managed_save(dom, flags)            save and stop a running or paused domain
    has_managed_save_image(dom, flags)  1 if the domain has a saved state, else 0
    managed_save_remove(dom, flags)     discard the saved state
    start(dom, flags)                   start: restore the saved state, or boot
    autostart(conn)                     host boot: restore autostart domains

Errors are libvirt.libvirtError instances with libvirt's error codes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import libvirt

from . import engine, restore_xml
from .errors import FastsaveError, ImageError
from .store import DomainBusy, ImageStore, StoreError, default_image_dir
from .virt import (check_domain, check_flags, check_qemu_local, check_writable, connection_kind,
                   fail, is_readonly, qmp)
from .worker import EngineProcess

__all__ = ["Options", "managed_save", "has_managed_save_image", "managed_save_remove", "start",
           "autostart", "image_store"]

SAVE_FLAGS = (libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE | libvirt.VIR_DOMAIN_SAVE_RUNNING
              | libvirt.VIR_DOMAIN_SAVE_PAUSED)
START_FLAGS = (libvirt.VIR_DOMAIN_START_PAUSED | libvirt.VIR_DOMAIN_START_BYPASS_CACHE
               | libvirt.VIR_DOMAIN_START_FORCE_BOOT)
FD_NAME = "fastsave"
POLL = 0.02
WORKER_GRACE = 60.0
GONE_WAIT = 5.0     # for libvirt to notice a QEMU whose monitor stopped answering
RECONNECT_TIMEOUT = 60.0
RECOVER_TIMEOUT = 30.0
# QEMU's default bandwidth cap would make a save ~10x slower; 1 TiB/s is "none".
UNLIMITED_BANDWIDTH = 1 << 40


@dataclasses.dataclass(frozen=True)
class Options:
    """Engine settings for managed save and start.

    direct: O_DIRECT image I/O. None (the default): saves write with O_DIRECT,
        as VIR_DOMAIN_SAVE_BYPASS_CACHE asks (hundreds of GB of images would
        otherwise evict what the guests' hosts need, and an image read back
        after a host reboot gains nothing from the cache); starts read through
        the page cache unless VIR_DOMAIN_START_BYPASS_CACHE is given (the
        kernel's readahead keeps a disk busier than one O_DIRECT reader, and
        the cached pages go with the image, which is removed once the guest
        runs). True: O_DIRECT both ways. False: the page cache both ways
        unless a BYPASS_CACHE flag is given.
    image_dir: overrides FASTSAVE_IMAGE_DIR and the connection's default store.
    progress: called with engine.Stats about four times a second.
    """

    mode: engine.Mode = "auto"
    level: int | None = None
    threads: int | None = None
    direct: bool | None = None
    chunk_size: int = engine.DEFAULT_CHUNK_SIZE
    image_dir: str | None = None
    progress: Callable[[engine.Stats], None] | None = None


def _options(options: Options | None, kw: dict[str, Any]) -> Options:
    base = options or Options()
    return dataclasses.replace(base, **kw) if kw else base


def image_store(conn: libvirt.virConnect, image_dir: str | None = None) -> ImageStore:
    """The store that holds images for domains of this connection."""
    kind, query = connection_kind(conn)
    return ImageStore(image_dir or default_image_dir(kind, query))


def _store_for(dom: libvirt.virDomain, opts: Options) -> ImageStore:
    try:
        return image_store(dom.connect(), opts.image_dir)
    except (StoreError, OSError) as e:
        raise fail(libvirt.VIR_ERR_OPERATION_FAILED, f"image store unusable: {e}") from e


@contextmanager
def _locked(store: ImageStore, dom: libvirt.virDomain) -> Iterator[str]:
    uuid = dom.UUIDString()
    try:
        with store.lock(uuid, dom.name()):
            _recover_dead_save(store, dom, uuid)
            yield uuid
    except DomainBusy as e:
        raise fail(libvirt.VIR_ERR_OPERATION_INVALID, str(e)) from None
    except StoreError as e:
        raise fail(libvirt.VIR_ERR_OPERATION_FAILED, f"image store: {e}") from None


def _recover_dead_save(store: ImageStore, dom: libvirt.virDomain, uuid: str) -> None:
    """A save whose process died left the guest paused, perhaps with QEMU's
    migration still going: stop that, and resume the guest if it ran."""
    store.discard_pending(uuid)
    mark = store.take_saving_mark(uuid)
    if mark is None or not dom.isActive():
        return
    try:
        with contextlib.suppress(libvirt.libvirtError):
            qmp(dom, "migrate_cancel")
        deadline = time.monotonic() + RECOVER_TIMEOUT
        while time.monotonic() < deadline:  # QEMU refuses 'cont' until it is over
            status = (qmp(dom, "query-migrate") or {}).get("status")
            if status not in ("setup", "active", "device", "pre-switchover", "cancelling"):
                break
            time.sleep(POLL)
        if mark.get("was_running") and dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
            dom.resume()
    except libvirt.libvirtError:
        if not dom.isActive():  # it went down meanwhile: nothing left to resume
            return
        store.mark_saving(uuid, mark)  # try again on the next call
        raise


def _wait_migration(dom: libvirt.virDomain, worker: EngineProcess, what: str) -> None:
    """Polls QEMU until its migration completes; raises with the engine's or
    QEMU's reason. A failed engine ends the wait at once (QEMU may sit on a
    cut stream), and QEMU gets a grace period once the engine is done."""
    grace_until = None
    while True:
        info = qmp(dom, "query-migrate") or {}
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise FastsaveError(f"QEMU {what} {status}: {info.get('error-desc', 'no reason given')}")
        if not worker.running():
            worker.result()  # raises the engine's error, if it had one
            if grace_until is None:
                grace_until = time.monotonic() + WORKER_GRACE
            elif time.monotonic() > grace_until:
                raise FastsaveError(f"QEMU {what} still {status!r} {WORKER_GRACE:.0f} s after "
                                    "the engine finished the stream")
        time.sleep(POLL)


def _engine_kw(opts: Options, direct: bool) -> dict[str, Any]:
    return {"threads": opts.threads, "direct": direct}


def managed_save(dom: libvirt.virDomain, flags: int = 0, *, options: Options | None = None,
                 **kw: Any) -> int:
    """Saves a running or paused persistent domain into the store and stops it.

    The domain is paused, QEMU's migration stream goes through the engine into
    an image that is made durable, and only then is the domain stopped. On any
    failure the domain is resumed to its prior state, no image remains, and
    the error names the cause. Returns 0.
    """
    func = "virDomainManagedSave"
    dom = check_domain(dom, func)
    check_flags(flags, SAVE_FLAGS, func)
    if flags & libvirt.VIR_DOMAIN_SAVE_RUNNING and flags & libvirt.VIR_DOMAIN_SAVE_PAUSED:
        raise fail(libvirt.VIR_ERR_INVALID_ARG,
                   "flags 'running' and 'paused' in virDomainManagedSave are mutually exclusive")
    check_qemu_local(dom, func)
    check_writable(dom, func)
    opts = _options(options, kw)
    if not dom.isPersistent():
        raise fail(libvirt.VIR_ERR_OPERATION_INVALID, "cannot do managed save for transient domain")
    store = _store_for(dom, opts)
    with _locked(store, dom) as uuid:
        state = dom.state()[0]
        if state not in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED):
            raise fail(libvirt.VIR_ERR_OPERATION_INVALID, "domain is not running")
        was_running = state == libvirt.VIR_DOMAIN_RUNNING
        comes_back_running = was_running
        if flags & libvirt.VIR_DOMAIN_SAVE_RUNNING:
            comes_back_running = True
        elif flags & libvirt.VIR_DOMAIN_SAVE_PAUSED:
            comes_back_running = False
        direct = opts.direct is not False or bool(flags & libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE)
        xml = restore_xml.clean_for_image(
            dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_MIGRATABLE))
        store.mark_saving(uuid, {"was_running": was_running, "pid": os.getpid()})
        try:
            _save(dom, store, uuid, xml, was_running, comes_back_running, opts, direct)
        finally:  # best effort: a cleanup failure must not hide the save's own error
            with contextlib.suppress(OSError):
                store.discard_pending(uuid)
            with contextlib.suppress(OSError):
                store.take_saving_mark(uuid)
    return 0


def _save(dom: libvirt.virDomain, store: ImageStore, uuid: str, xml: str, was_running: bool,
          comes_back_running: bool, opts: Options, direct: bool) -> None:
    """The engine writes a pending image; it becomes the domain's image only
    once QEMU has reported the whole stream sent (a stream cut short by a
    dying QEMU also ends in EOF, and must never pass for a saved state)."""
    name = dom.name()
    uri = dom.connect().getURI()
    path = store.pending_path(uuid)
    if was_running:
        dom.suspend()
    worker: EngineProcess | None = None
    old_bandwidth = None
    try:
        old_bandwidth = (qmp(dom, "query-migrate-parameters") or {}).get("max-bandwidth")
        qmp(dom, "migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH})
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            worker = EngineProcess.save(
                r, path, opts.progress, mode=opts.mode, level=opts.level, chunk_size=opts.chunk_size,
                xml=xml, name=name, uuid=dom.UUIDString(), was_running=comes_back_running,
                **_engine_kw(opts, direct))
        finally:
            os.close(r)
        try:
            qmp(dom, "getfd", {"fdname": FD_NAME}, fds=[w])
        finally:
            os.close(w)
        qmp(dom, "migrate", {"uri": f"fd:{FD_NAME}"})
        _wait_migration(dom, worker, "migration")
        worker.result()
        store.commit_pending(uuid)
    except BaseException as e:
        cause = _cause(e, worker)
        state = _roll_back(dom, worker, was_running, old_bandwidth, uri, dom.UUIDString())
        raise fail(libvirt.VIR_ERR_OPERATION_FAILED,
                   f"managed save of domain {name} failed: {cause}; no image was kept and {state}"
                   ) from e
    dom.destroy()


def _cause(e: BaseException, worker: EngineProcess | None) -> str:
    """The engine's own error explains a failure better than QEMU's broken pipe."""
    if worker is not None:
        try:
            worker.result(timeout=10)
        except (OSError, FastsaveError, ValueError, MemoryError) as inner:
            if str(inner) != str(e):
                return f"{inner} ({e})"
        except Exception:  # noqa: BLE001 - still running: the outer error is the cause
            pass
    return str(e)


def _reconnect(dom: libvirt.virDomain, uri: str, uuid: str) -> libvirt.virDomain:
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
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                return dom
            time.sleep(0.5)


def _roll_back(dom: libvirt.virDomain, worker: EngineProcess | None, was_running: bool,
               old_bandwidth: object, uri: str = "", uuid: str = "") -> str:
    """Stops the save and puts the domain back as it was; says how it was left."""
    if uri:
        dom = _reconnect(dom, uri, uuid)
    try:
        if dom.isActive():
            try:
                qmp(dom, "migrate_cancel")
            except libvirt.libvirtError:
                pass
    except libvirt.libvirtError:
        pass
    if worker is not None:
        worker.kill()
        try:
            worker.result(timeout=30)
        except Exception:  # noqa: BLE001 - the cause is already known
            pass
    gone = "the domain is no longer running (its QEMU process is gone)"
    try:
        if _qemu_gone(dom):
            return gone
        if old_bandwidth is not None:
            try:
                qmp(dom, "migrate-set-parameters", {"max-bandwidth": old_bandwidth})
            except libvirt.libvirtError:
                pass
        state = dom.state()[0]
        if was_running and state == libvirt.VIR_DOMAIN_PAUSED:
            dom.resume()
            return "the domain is running again"
        if state == libvirt.VIR_DOMAIN_PAUSED:
            return "the domain is paused, as it was"
        if state == libvirt.VIR_DOMAIN_RUNNING:
            return "the domain is running"
        return gone if _qemu_gone(dom) else f"the domain is in state {state}"
    except libvirt.libvirtError as e:
        if _qemu_gone(dom):  # QEMU died between the check and the resume
            return gone
        return f"the domain could not be resumed: {e}"


def _qemu_gone(dom: libvirt.virDomain) -> bool:
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
        try:
            if not dom.isActive():
                return True
        except libvirt.libvirtError:
            pass
        time.sleep(POLL)
    return False


def has_managed_save_image(dom: libvirt.virDomain, flags: int = 0, *,
                           options: Options | None = None, **kw: Any) -> int:
    """1 if the domain has a saved state in the store, else 0. Works on a
    read-only connection. An image found for a running domain is stale: it is
    removed (when the connection may write) and 0 is returned."""
    func = "virDomainHasManagedSaveImage"
    dom = check_domain(dom, func)
    check_flags(flags, 0, func)
    check_qemu_local(dom, func)
    opts = _options(options, kw)
    store = _store_for(dom, opts)
    uuid = dom.UUIDString()
    active = dom.isActive()  # also: an undefined domain raises VIR_ERR_NO_DOMAIN here
    try:
        if not store.has_image(uuid):
            if active and not is_readonly(dom):
                try:
                    with store.lock(uuid, dom.name()):
                        _recover_dead_save(store, dom, uuid)
                except DomainBusy:
                    pass
            return 0
        if not active:
            return 1
    except StoreError as e:
        raise fail(libvirt.VIR_ERR_OPERATION_FAILED, str(e)) from e
    if not is_readonly(dom):
        try:
            with store.lock(uuid, dom.name()):  # a save or restore in progress owns it
                _recover_dead_save(store, dom, uuid)
                if dom.isActive():
                    store.remove_image(uuid)
        except DomainBusy:
            pass
    return 0


def managed_save_remove(dom: libvirt.virDomain, flags: int = 0, *, options: Options | None = None,
                        **kw: Any) -> int:
    """Discards the domain's saved state; succeeds when there is none."""
    func = "virDomainManagedSaveRemove"
    dom = check_domain(dom, func)
    check_flags(flags, 0, func)
    check_qemu_local(dom, func)
    check_writable(dom, func)
    store = _store_for(dom, _options(options, kw))
    with _locked(store, dom) as uuid:
        store.remove_image(uuid)
    return 0


def start(dom: libvirt.virDomain, flags: int = 0, *, options: Options | None = None,
          **kw: Any) -> int:
    """Starts a domain: from its saved state when it has one, else a normal boot.

    VIR_DOMAIN_START_FORCE_BOOT discards the saved state and boots fresh;
    VIR_DOMAIN_START_PAUSED leaves the domain paused; VIR_DOMAIN_START_BYPASS_CACHE
    reads the image with O_DIRECT. If restoring fails the domain stays shut
    off, the image is kept, and the error names the cause. Returns 0.
    """
    func = "virDomainCreateWithFlags"
    dom = check_domain(dom, func)
    check_flags(flags, START_FLAGS, func)
    check_qemu_local(dom, func)
    check_writable(dom, func)
    opts = _options(options, kw)
    store = _store_for(dom, opts)
    with _locked(store, dom) as uuid:
        if dom.isActive():
            raise fail(libvirt.VIR_ERR_OPERATION_INVALID, "domain is already running")
        if flags & libvirt.VIR_DOMAIN_START_FORCE_BOOT:
            store.remove_image(uuid)
        elif store.has_image(uuid):
            _restore(dom, store, uuid, flags, opts)
            return 0
        dom.createWithFlags(flags)
    return 0


def _restore(dom: libvirt.virDomain, store: ImageStore, uuid: str, flags: int,
             opts: Options) -> None:
    name = dom.name()
    path = store.image_path(uuid)
    keep = (f"the image {path} is kept; start with VIR_DOMAIN_START_FORCE_BOOT "
            f"(fastsave start --force-boot {name}) to boot fresh")
    image_fd = -1
    try:
        image_fd = store.open_image(uuid)
        info = engine.inspect(f"/proc/self/fd/{image_fd}")
        xml = restore_xml.for_restore(info, dom, store.issue_token(uuid))
    except (ImageError, restore_xml.RefusedImage, StoreError, OSError) as e:
        store.revoke_token(uuid)
        if image_fd >= 0:
            os.close(image_fd)
        raise fail(libvirt.VIR_ERR_OPERATION_FAILED,
                   f"cannot restore domain {name}: {e}; {keep}") from e
    try:
        _restore_from(dom, store, uuid, flags, opts, info, xml, image_fd, path, keep)
    except BaseException:
        os.close(image_fd)
        raise
    # The image's name is gone and the guest runs: the last close frees the
    # file's blocks (~0.1 s per GB on ext4), which need not hold up the caller.
    threading.Thread(target=os.close, args=(image_fd,), name="fastsave-free-image",
                     daemon=True).start()


def _restore_from(dom: libvirt.virDomain, store: ImageStore, uuid: str, flags: int, opts: Options,
                  info: engine.ImageInfo, xml: str, image_fd: int, path: str, keep: str) -> None:
    name = dom.name()
    direct = opts.direct is True or bool(flags & libvirt.VIR_DOMAIN_START_BYPASS_CACHE)
    worker: EngineProcess | None = None
    live: libvirt.virDomain | None = None
    r = -1
    try:
        # The engine starts (and checks the image) while QEMU starts; it
        # blocks on the full pipe until QEMU reads.
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            worker = EngineProcess.restore(image_fd, w, opts.progress, **_engine_kw(opts, direct))
        finally:
            os.close(w)
        live = dom.connect().createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
        try:
            qmp(live, "getfd", {"fdname": FD_NAME}, fds=[r])
        finally:
            os.close(r)
            r = -1
        qmp(live, "migrate-incoming", {"uri": f"fd:{FD_NAME}"})
        _wait_migration(live, worker, "incoming migration")
        worker.result()
    except BaseException as e:
        if r >= 0:
            os.close(r)
        # QEMU did not start: its error is the cause, not the engine's broken pipe
        cause = str(e) if live is None else _cause(e, worker)
        if worker is not None:
            worker.kill()
        try:
            if live is not None and live.isActive():
                live.destroy()
        except libvirt.libvirtError:
            pass
        raise fail(libvirt.VIR_ERR_OPERATION_FAILED,
                   f"restore of domain {name} from {path} failed: {cause}; {keep}") from e
    finally:
        store.revoke_token(uuid)
    store.remove_image(uuid)  # the state lives in QEMU now: the image is stale from here
    if info.was_running and not flags & libvirt.VIR_DOMAIN_START_PAUSED:
        live.resume()


def autostart(conn: libvirt.virConnect, *, include_all: bool = False,
              options: Options | None = None, **kw: Any) -> list[tuple[str, str | None]]:
    """Host boot: restores every shut-off autostart domain that has a saved
    state (every such domain with include_all), in bounded parallel.
    Returns (name, error message or None) for each domain it tried."""
    from .bulk import restore_all
    report = restore_all(conn, include_all=include_all, options=_options(options, kw))
    return [(r.name, None if r.ok else r.error) for r in report.results]
