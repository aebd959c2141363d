"""Settling what a dead save or restore left, and the invariant

    never (domain running AND image present)

checked at the start of every fastsave call on a domain, under its lock.

A save or restore writes an operation mark (`.UUID.saving`: {"op": "save",
"was_running"} or {"op": "restore", "resume"}) before it touches the domain
and clears it only once the outcome is settled. A mark found under a free
lock means the process died (or could not finish); recovery finishes its
work and clears the mark only after it succeeded:

- save, image not committed: cancel QEMU's migration, resume if it ran;
- save, image committed: finish the save: stop the domain (the guest has
  been paused since before the stream began, so nothing is lost);
- restore, QEMU still waiting for its stream ("inmigrate"): stop that QEMU
  (it holds no guest state), keep the image;
- restore, stream complete: the state lives in QEMU: remove the image, resume
  as the restore was asked to.

With no mark, a running domain beside an image means it was started behind
fastsave's back (no hook): the image is stale and removed, unless the running
QEMU is one of fastsave's own restores still waiting for its stream, which is
stopped instead (the image is the only copy).

An image published at libvirt's managed-save path whose link libvirt has
since removed (it restored or discarded the state) is stale and removed; a
link left under a renamed domain's old name is moved to the new one
(published.settle).
"""

from __future__ import annotations

import libvirt

from . import published, restore_xml
from .restoring import complete
from .saving import STOP_TIMEOUT, cancel_migration, destroy, finish_save
from .store import ImageStore
from .virt import fail, qmp

__all__ = ["settle", "RECOVER_TIMEOUT"]

RECOVER_TIMEOUT = 30.0


def settle(store: ImageStore, dom: libvirt.virDomain, uuid: str) -> None:
    """Finishes a dead operation's work and restores the invariant. Raises
    libvirtError (mark kept) when that is not possible now."""
    store.discard_pending(uuid)
    mark = store.peek_saving_mark(uuid)
    if mark is not None:
        if mark.get("op") == "restore":
            _restore_left(store, dom, uuid, bool(mark.get("resume")))
        else:
            _save_left(store, dom, uuid, bool(mark.get("was_running")))
        store.clear_saving_mark(uuid)
        store.revoke_token(uuid)
    published.settle(store, dom, uuid)
    if dom.isActive() and store.has_image(uuid):
        _running_beside_image(store, dom, uuid)


def _save_left(store: ImageStore, dom: libvirt.virDomain, uuid: str, was_running: bool) -> None:
    if not dom.isActive():
        return  # it went down meanwhile; a committed image is its saved state
    if store.has_image(uuid):
        finish_save(dom, dom.connect().getURI(), uuid, dom.name(), store.image_path(uuid))
        published.publish(dom, store, uuid)
        return
    try:
        cancel_migration(dom, RECOVER_TIMEOUT)
        if was_running and dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
            dom.resume()
    except libvirt.libvirtError:
        if not dom.isActive():  # it went down meanwhile: nothing left to resume
            return
        raise


def _incoming_waiting(dom: libvirt.virDomain) -> bool:
    """True while QEMU waits for (or reads) an incoming stream."""
    return (qmp(dom, "query-status") or {}).get("status") == "inmigrate"


def _restore_left(store: ImageStore, dom: libvirt.virDomain, uuid: str, resume: bool) -> None:
    if not dom.isActive():
        return
    if _incoming_waiting(dom):
        _stop(dom, uuid)
        return
    complete(dom, store, uuid, resume)


def _carries_token(dom: libvirt.virDomain) -> bool:
    try:
        dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, restore_xml.TOKEN_NS,
                     libvirt.VIR_DOMAIN_AFFECT_LIVE)
        return True
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return False
        raise


def _running_beside_image(store: ImageStore, dom: libvirt.virDomain, uuid: str) -> None:
    if _incoming_waiting(dom):
        if _carries_token(dom):  # fastsave's own restore, whose controller is gone
            _stop(dom, uuid)
        return  # someone else's incoming migration: not ours to judge
    store.remove_image(uuid)
    restore_xml.unbind_definition(dom)


def _stop(dom: libvirt.virDomain, uuid: str) -> None:
    err = destroy(dom, dom.connect().getURI(), uuid, STOP_TIMEOUT)
    if err is not None:
        raise fail(libvirt.VIR_ERR_OPERATION_FAILED,
                   f"cannot stop the half-restored domain {dom.name()}: {err}")

