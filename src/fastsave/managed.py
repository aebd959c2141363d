"""Managed save for libvirt QEMU domains: the system keeps a domain's saved
state, restores it when the domain starts again, and never keeps it once the
domain runs.

    managed_save(dom, flags)            save and stop a running or paused domain
    has_managed_save_image(dom, flags)  1 if the domain has a saved state, else 0
    managed_save_remove(dom, flags)     discard the saved state
    start(dom, flags)                   start: restore the saved state, or boot
    managed_save_get_xml_desc(dom, flags)      the domain XML kept in the saved state
    managed_save_define_xml(dom, dxml, flags)  replace it (saved_xml.py)

Errors are libvirt.libvirtError instances with libvirt's error codes. The
save flow lives in saving.py, the restore flow in restoring.py, what a dead
call left and the running-beside-image invariant in recovery.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import libvirt

from . import engine, published, recovery, restore_xml, restoring, saved_xml, saving
from .errors import ImageError
from .store import DomainBusy, ImageStore, StoreError, open_store
from .virt import check_domain, check_flags, check_qemu_local, check_writable, connection_kind, fail, is_readonly

__all__ = ["Options", "managed_save", "has_managed_save_image", "managed_save_remove", "start",
           "image_store", "managed_save_get_xml_desc", "managed_save_define_xml"]

log = logging.getLogger("fastsave")

SAVE_FLAGS = (libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE | libvirt.VIR_DOMAIN_SAVE_RUNNING
              | libvirt.VIR_DOMAIN_SAVE_PAUSED)
START_FLAGS = (libvirt.VIR_DOMAIN_START_PAUSED | libvirt.VIR_DOMAIN_START_BYPASS_CACHE
               | libvirt.VIR_DOMAIN_START_FORCE_BOOT)


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
    progress: called with engine.Stats about four times a second (from a
        helper thread; an exception it raises stops further calls, not the save).
    stall_timeout: a save or restore in which no byte moves for this many
        seconds is cancelled and rolled back.
    timeout: an overall limit in seconds for one save or restore (None: none).
    """

    mode: engine.Mode = "auto"
    level: int | None = None
    threads: int | None = None
    direct: bool | None = None
    chunk_size: int = engine.DEFAULT_CHUNK_SIZE
    image_dir: str | None = None
    progress: Callable[[engine.Stats], None] | None = None
    stall_timeout: float = 60.0
    timeout: float | None = None
    # Saves: 1 = one migration stream; N > 1 = QEMU's multifd, a main channel
    # and N memory channels over a private socket (channels.py); None (the
    # default) = chosen per save from the CPUs it may use (`threads`, else the
    # process's): one stream below 8 CPUs, then one channel per 4 CPUs, at
    # most 16; one stream where QEMU lacks multifd or runs confined by AppArmor
    # or SELinux (channels.choose_count). Restores follow the image.
    channels: int | None = None

    def engine_options(self, direct: bool) -> engine.EngineOptions:
        """The engine's settings for one save or restore (ValueError for a bad
        one), with O_DIRECT as resolved for the call from `direct` and its flags."""
        return engine.EngineOptions(mode=self.mode, level=self.level, threads=self.threads,
                                    direct=direct, chunk_size=self.chunk_size)


def _options(options: Options | None, kw: dict[str, Any]) -> Options:
    base = options or Options()
    return dataclasses.replace(base, **kw) if kw else base


def image_store(conn: libvirt.virConnect, image_dir: str | None = None, *,
                saving: bool = False) -> ImageStore:
    """The store that holds images for domains of this connection (close it,
    or use it as a context manager: it holds the directory open). `saving`:
    on qemu:///system, refuse a store the libvirt hook does not guard."""
    kind, query = connection_kind(conn)
    return open_store(kind, query, image_dir, saving=saving)


def _store_for(dom: libvirt.virDomain, opts: Options, saving: bool = False) -> ImageStore:
    try:
        return image_store(dom.connect(), opts.image_dir, saving=saving)
    except (StoreError, OSError) as e:
        raise fail(libvirt.VIR_ERR_OPERATION_FAILED, f"image store unusable: {e}") from e


@contextmanager
def _locked(store: ImageStore, dom: libvirt.virDomain) -> Iterator[str]:
    """Holds the domain's lock after settling what a dead call left."""
    uuid = dom.UUIDString()
    try:
        with store.lock(uuid, dom.name()):
            recovery.settle(store, dom, uuid)
            yield uuid
    except DomainBusy as e:
        raise fail(libvirt.VIR_ERR_OPERATION_INVALID, str(e)) from None
    except StoreError as e:
        raise fail(libvirt.VIR_ERR_OPERATION_FAILED, f"image store: {e}") from None


def _bound_image(store: ImageStore, dom: libvirt.virDomain, uuid: str,
                 writable: bool) -> tuple[int, engine.ImageInfo] | None:
    """The domain's image (open fd, info) if it was taken from the domain's
    current definition. An image that was not (the domain was undefined and
    defined again since) is no saved state of this domain: with `writable`
    it is quarantined, never restored and never deleted."""
    try:
        fd = store.open_image(uuid)
    except FileNotFoundError:
        return None
    try:
        info = engine.inspect(fd, name=store.image_path(uuid))
        restore_xml.check_binding(info, dom)
        return fd, info
    except restore_xml.ForeignImage as e:
        os.close(fd)
        if writable:
            moved = store.quarantine_image(uuid)
            log.warning("domain %s: %s; the image was set aside as %s and will not be restored",
                        dom.name(), e, moved)
        return None
    except BaseException:
        os.close(fd)
        raise


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
    with _store_for(dom, opts, saving=True) as store, _locked(store, dom) as uuid:
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
        binding = restore_xml.new_binding()
        xml = restore_xml.clean_for_image(
            dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_MIGRATABLE), binding)
        store.mark_saving(uuid, {"op": "save", "was_running": was_running, "pid": os.getpid()})
        try:
            restore_xml.bind_definition(dom, binding)
        except libvirt.libvirtError as e:
            store.clear_saving_mark(uuid)
            raise fail(libvirt.VIR_ERR_OPERATION_FAILED,
                       f"managed save of domain {dom.name()} failed: cannot record the save in "
                       f"its definition: {e}; the domain was not touched") from e
        try:
            saving.save(dom, store, uuid, xml, was_running, comes_back_running, opts, direct)
        finally:  # best effort: a cleanup failure must not hide the save's own error
            with contextlib.suppress(OSError):
                store.discard_pending(uuid)
    return 0


def has_managed_save_image(dom: libvirt.virDomain, flags: int = 0, *,
                           options: Options | None = None, **kw: Any) -> int:
    """1 if the domain has a saved state in the store, else 0. Works on a
    read-only connection. On a writable one it first settles what a dead
    call left (see recovery.py): an image beside a running domain is stale
    and removed; an image taken from an earlier definition of the domain is
    no saved state of it and is set aside."""
    func = "virDomainHasManagedSaveImage"
    dom = check_domain(dom, func)
    check_flags(flags, 0, func)
    check_qemu_local(dom, func)
    uuid = dom.UUIDString()
    dom.isActive()  # an undefined domain raises VIR_ERR_NO_DOMAIN here
    with _store_for(dom, _options(options, kw)) as store:
        return _has(store, dom, uuid)


def _has(store: ImageStore, dom: libvirt.virDomain, uuid: str) -> int:
    try:
        if not is_readonly(dom):
            try:
                with store.lock(uuid, dom.name()):
                    recovery.settle(store, dom, uuid)
                    return _has_state(store, dom, uuid, writable=True)
            except DomainBusy:
                pass  # a save or restore in progress owns it: report what is there
        return _has_state(store, dom, uuid, writable=False)
    except StoreError as e:
        raise fail(libvirt.VIR_ERR_OPERATION_FAILED, str(e)) from e


def _has_state(store: ImageStore, dom: libvirt.virDomain, uuid: str, writable: bool) -> int:
    if dom.isActive() or published.consumed(store, uuid):
        return 0
    try:
        found = _bound_image(store, dom, uuid, writable)
    except (ImageError, OSError):
        return 1  # there is an image; a start says what is wrong with it
    if found is None:
        return 0
    os.close(found[0])
    return 1


def managed_save_remove(dom: libvirt.virDomain, flags: int = 0, *, options: Options | None = None,
                        **kw: Any) -> int:
    """Discards the domain's saved state; succeeds when there is none."""
    func = "virDomainManagedSaveRemove"
    dom = check_domain(dom, func)
    check_flags(flags, 0, func)
    check_qemu_local(dom, func)
    check_writable(dom, func)
    with _store_for(dom, _options(options, kw)) as store, _locked(store, dom) as uuid:
        store.remove_image(uuid)
        restore_xml.unbind_definition(dom)
    return 0


def start(dom: libvirt.virDomain, flags: int = 0, *, options: Options | None = None,
          **kw: Any) -> int:
    """Starts a domain: from its saved state when it has one, else a normal boot.

    VIR_DOMAIN_START_FORCE_BOOT discards the saved state and boots fresh;
    VIR_DOMAIN_START_PAUSED leaves the domain paused; VIR_DOMAIN_START_BYPASS_CACHE
    reads the image with O_DIRECT. If restoring fails the domain stays shut
    off, the image is kept, and the error names the cause. A running domain
    has no saved state: starting it removes any image found for it (and then
    fails as libvirt does: already running). Returns 0.
    """
    func = "virDomainCreateWithFlags"
    dom = check_domain(dom, func)
    check_flags(flags, START_FLAGS, func)
    check_qemu_local(dom, func)
    check_writable(dom, func)
    opts = _options(options, kw)
    with _store_for(dom, opts) as store, _locked(store, dom) as uuid:
        if dom.isActive():
            raise fail(libvirt.VIR_ERR_OPERATION_INVALID, "domain is already running")
        if flags & libvirt.VIR_DOMAIN_START_FORCE_BOOT:
            store.remove_image(uuid)
            restore_xml.unbind_definition(dom)
        else:
            try:
                found = _bound_image(store, dom, uuid, writable=True)
            except (ImageError, StoreError, OSError) as e:
                raise fail(libvirt.VIR_ERR_OPERATION_FAILED,
                           f"cannot restore domain {dom.name()}: {e}; "
                           f"{restoring.kept(store.image_path(uuid), dom.name())}") from e
            if found is not None:
                restoring.restore(dom, store, uuid, flags, opts, found[1], found[0])
                return 0
        dom.createWithFlags(flags)
    return 0


# -- the XML a saved state keeps (virsh managedsave-dumpxml / -define / -edit)

def _no_state() -> Exception:
    return fail(libvirt.VIR_ERR_OPERATION_INVALID, "domain does not have managed save image")


def managed_save_get_xml_desc(dom: libvirt.virDomain, flags: int = 0, *,
                              options: Options | None = None, **kw: Any) -> str:
    """The domain XML kept in the domain's saved state. Without
    VIR_DOMAIN_SAVE_IMAGE_XML_SECURE secrets are left out; a read-only
    connection is denied the secure form. No saved state: VIR_ERR_OPERATION_INVALID."""
    func = "virDomainManagedSaveGetXMLDesc"
    dom = check_domain(dom, func)
    secure = libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE
    if isinstance(flags, int) and flags & secure and is_readonly(dom):
        raise fail(libvirt.VIR_ERR_OPERATION_DENIED,
                   f"operation forbidden: {func} with secure flag", libvirt.VIR_FROM_DOMAIN)
    check_flags(flags, secure, func)
    check_qemu_local(dom, func)
    dom.isActive()  # an undefined domain raises VIR_ERR_NO_DOMAIN here
    with _store_for(dom, _options(options, kw)) as store:
        uuid = dom.UUIDString()
        try:
            if not is_readonly(dom):
                try:
                    with store.lock(uuid, dom.name()):
                        recovery.settle(store, dom, uuid)
                        found = None if dom.isActive() else _bound_image(store, dom, uuid, True)
                        xml = None if found is None else found[1].xml
                        if found is not None:
                            os.close(found[0])
                        if xml is None:
                            raise _no_state()
                        return saved_xml.public_xml(xml, bool(flags & secure))
                except DomainBusy:
                    pass  # a save or restore in progress owns it: read what is there
            stale = dom.isActive() or published.consumed(store, uuid)  # libvirt took it
            found = None if stale else _bound_image(store, dom, uuid, False)
        except (ImageError, StoreError, OSError) as e:
            raise fail(libvirt.VIR_ERR_OPERATION_FAILED,
                       f"cannot read the saved state of domain {dom.name()}: {e}") from e
        if found is None:
            raise _no_state()
        os.close(found[0])
        return saved_xml.public_xml(found[1].xml, bool(flags & secure))


def managed_save_define_xml(dom: libvirt.virDomain, dxml: str, flags: int = 0, *,
                            options: Options | None = None, **kw: Any) -> int:
    """Replaces the domain XML kept in the domain's saved state; the domain
    restores into it. VIR_DOMAIN_SAVE_RUNNING / VIR_DOMAIN_SAVE_PAUSED also
    change the state it comes back in. Refused without a saved state
    (VIR_ERR_OPERATION_INVALID), for XML libvirt's guest-ABI check refuses
    (libvirt's error), on a read-only connection. The image is replaced
    atomically: any failure leaves the old one as it was. Returns 0."""
    func = "virDomainManagedSaveDefineXML"
    dom = check_domain(dom, func)
    if not isinstance(dxml, str):
        raise fail(libvirt.VIR_ERR_INVALID_ARG, f"dxml in {func} must be a string",
                   libvirt.VIR_FROM_DOMAIN)
    check_flags(flags, libvirt.VIR_DOMAIN_SAVE_RUNNING | libvirt.VIR_DOMAIN_SAVE_PAUSED, func)
    if flags & libvirt.VIR_DOMAIN_SAVE_RUNNING and flags & libvirt.VIR_DOMAIN_SAVE_PAUSED:
        raise fail(libvirt.VIR_ERR_INVALID_ARG, "Flags 'VIR_DOMAIN_SAVE_RUNNING' and "
                   "'VIR_DOMAIN_SAVE_PAUSED' are mutually exclusive", libvirt.VIR_FROM_DOMAIN)
    check_qemu_local(dom, func)
    check_writable(dom, func)
    opts = _options(options, kw)
    running = True if flags & libvirt.VIR_DOMAIN_SAVE_RUNNING else \
        False if flags & libvirt.VIR_DOMAIN_SAVE_PAUSED else None
    with _store_for(dom, opts) as store, _locked(store, dom) as uuid:
        try:
            found = None if dom.isActive() else _bound_image(store, dom, uuid, writable=True)
        except (ImageError, StoreError, OSError) as e:
            raise fail(libvirt.VIR_ERR_OPERATION_FAILED,
                       f"cannot read the saved state of domain {dom.name()}: {e}") from e
        if found is None:
            raise _no_state()
        fd, info = found
        try:
            saved_xml.define(dom, store, uuid, info, fd, dxml, running, opts.direct is not False)
        finally:
            os.close(fd)
    return 0
