"""Saved states where libvirt looks for its own: libvirt's managed-save path.

After a save commits, an image whose format the installed libvirt can read is
hard-linked (no copy, atomically) to `<libvirt state dir>/qemu/save/NAME.save`,
the file libvirt's own managed save writes. Then every libvirt start path
restores it as libvirt's own state: `virsh start`, libvirtd's autostart,
libvirt-guests and any other client; `virsh start --force-boot`,
`virsh managedsave-remove` and `virsh undefine --managed-save` discard it;
`virsh undefine` is refused while it exists. fastsave's own calls keep their
faster restore path and remove libvirt's link with the image.

Who may read what (libvirt's save image header, `format`):
  0 raw   every libvirt
  5 zstd  libvirt >= 10.4.0 (QEMU_SAVE_FORMAT_ZSTD; 9.0 refuses it: "Invalid
          compressed save format 5"; measured: 11.3 restores fastsave's zstd images)
An image libvirt cannot read, or one on another file system than libvirt's
save directory (a hard link is impossible), is not published: the libvirt
hook keeps refusing plain starts of its domain with a pointer to `fastsave
start`.

Which state a domain is in is derived, not recorded: the store keeps a record
of the link it made (`.UUID.published`, store.Publication), and "published"
means the file at the recorded path *is* the image (same inode). A record
whose link is gone means libvirt took the state (restored or discarded it),
so the store's copy is stale and goes at the next look: in the hook's
`prepare` and `started` phases and in every fastsave call (recovery.settle).

A rename (`virsh domrename`; libvirt accepts it for a saved domain) leaves
libvirt's file under the old name, and libvirt refuses to restore an image
whose XML names another domain ("cannot restore domain ... from a file which
belongs to domain ..."). So after a rename the state follows the domain
through fastsave's own start (by UUID; the guest-ABI check ignores the name),
and libvirt's link is withdrawn at the next look: the hook then refuses a
plain start with the pointer to `fastsave start`.

The hook (hook.py) runs `hook_main` in a child (python -I, the package loaded
by its directory, as worker.py does) for a domain whose image has a record:
at `prepare begin` it checks a published image before libvirt reads it (every
chunk by the engine's verify, and the binding to the persistent definition
libvirt keeps in its config directory) and sets a bad one aside; at `started
begin` the store lets go of an image libvirt restored. It never calls libvirt
(libvirtd waits for the hook).
"""

from __future__ import annotations

import logging
import os
import sys
import xml.etree.ElementTree as ET

import libvirt

from . import engine, restore_xml
from .errors import ImageError
from .store import DomainBusy, ImageStore, StoreError
from .virt import connection_kind

__all__ = ["SYSTEM_SAVE_DIR", "LIBVIRT_ZSTD_VERSION", "save_dir", "file_name", "readable",
           "publish", "settle", "consumed", "hook_main"]

log = logging.getLogger("fastsave")

SYSTEM_SAVE_DIR = "/var/lib/libvirt/qemu/save"
FORMAT_RAW, FORMAT_ZSTD = 0, 5
LIBVIRT_ZSTD_VERSION = 10_004_000  # 10.4.0, as conn.getLibVersion() reports it


def save_dir(conn: libvirt.virConnect) -> str | None:
    """libvirt's managed-save directory for this connection's domains (None:
    a connection fastsave does not publish for)."""
    kind, query = connection_kind(conn)
    if kind == "embed":
        return os.path.join(query["root"], "lib", "qemu", "save")
    if kind == "system":
        return SYSTEM_SAVE_DIR
    return None


def file_name(dom_name: str) -> str | None:
    """libvirt's managed-save file name for a domain name (None if the name
    cannot be one file name)."""
    if not dom_name or "/" in dom_name or "\0" in dom_name or dom_name in (".", ".."):
        return None
    return dom_name + ".save"


def readable(libvirt_format: int, lib_version: int) -> bool:
    """Whether a libvirt of this version restores this save image format."""
    if libvirt_format == FORMAT_RAW:
        return True
    return libvirt_format == FORMAT_ZSTD and lib_version >= LIBVIRT_ZSTD_VERSION


def publish(dom: libvirt.virDomain, store: ImageStore, uuid: str) -> str | None:
    """Publishes the domain's committed image when this libvirt can restore
    it. Returns libvirt's path, or None (with the reason logged at debug
    level) when it is not published. Never raises for a reason that leaves
    the image good: the save stands, plain starts are refused by the hook."""
    try:
        conn = dom.connect()
        directory, name = save_dir(conn), file_name(dom.name())
        if directory is None or name is None:
            log.debug("domain %s: no libvirt managed-save path to publish at", dom.name())
            return None
        fd = store.open_image(uuid)
        try:
            fmt = engine.inspect(fd, name=store.image_path(uuid)).libvirt_format
        finally:
            os.close(fd)
        version = conn.getLibVersion()
        if not readable(fmt, version):
            log.debug("domain %s: libvirt %d cannot read save image format %d; not published",
                      dom.name(), version, fmt)
            return None
        if not os.path.isdir(directory):
            return None
        path = store.publish(uuid, directory, name)
        if path is None:
            log.debug("domain %s: %s is on another file system than the store; not published",
                      dom.name(), directory)
        return path
    except (OSError, StoreError, ImageError, libvirt.libvirtError) as e:
        log.warning("domain %s: its saved state was not made visible to libvirt (%s); plain "
                    "libvirt starts are refused, 'fastsave start' restores it", dom.name(), e)
        try:
            store.unpublish(uuid)
        except (OSError, StoreError):
            pass
        return None


def consumed(store: ImageStore, uuid: str) -> bool:
    """The image was published and libvirt has taken it since: stale."""
    pub = store.publication(uuid)
    return pub is not None and pub.consumed


def settle(store: ImageStore, dom: libvirt.virDomain, uuid: str) -> None:
    """Part of recovery.settle (under the domain's lock): an image libvirt took
    is removed; a link left under a renamed domain's old name is withdrawn
    (libvirt restores no image whose XML names another domain)."""
    pub = store.publication(uuid)
    if pub is None:
        return
    if pub.consumed:
        store.remove_image(uuid)
        restore_xml.unbind_definition(dom)
        log.info("domain %s: libvirt restored or discarded its saved state; fastsave's copy "
                 "was removed", dom.name())
        return
    if pub.name != file_name(dom.name()):
        store.unpublish(uuid)  # fastsave start restores it under the new name


# -- the libvirt hook's helper (runs under libvirtd; never calls libvirt) ----------

class _Refused(Exception):
    pass


def _definition_binding(definitions: str, name: str, uuid: str) -> str | None:
    """The binding in the persistent definition libvirt keeps for `name`."""
    path = os.path.join(definitions, name + ".xml")
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise _Refused(f"its persistent definition {path} cannot be read ({e})") from None
    if (root.findtext("uuid") or "").strip().lower() != uuid:
        raise _Refused(f"its persistent definition {path} is of another domain (UUID differs)")
    found = [el.get("image") for el in root.findall(f"./metadata/{{{restore_xml.BIND_NS}}}saved")]
    return found[0] if len(found) == 1 and found[0] else None


def _check(store: ImageStore, uuid: str, name: str, definitions: str) -> None:
    """What libvirt is about to restore belongs to the domain's current
    definition and every chunk of it is intact; raises _Refused otherwise."""
    fd = store.open_image(uuid)
    try:
        info = engine.inspect(fd, name=store.image_path(uuid))
        if info.uuid is None or str(info.uuid) != uuid:
            raise _Refused("the image belongs to another domain (UUID differs)")
        theirs = restore_xml.image_binding(info.xml)
        if theirs is None or theirs != _definition_binding(definitions, name, uuid):
            raise _Refused("the image was not taken from the domain's current definition (it was "
                           "defined again after the save)")
        engine.verify(fd, name=store.image_path(uuid))
    except ImageError as e:
        raise _Refused(f"the image failed its check: {e}") from None
    finally:
        os.close(fd)


def _prepare(store: ImageStore, uuid: str, name: str, definitions: str) -> str | None:
    """`prepare begin` of a plain libvirt start: None lets it go on, else why not."""
    pub = store.publication(uuid)
    if not store.has_image(uuid):
        store.unpublish(uuid)  # a record left behind
        return None
    if pub is not None and pub.consumed:
        store.remove_image(uuid)  # libvirt discarded it (force-boot, managedsave-remove)
        return None
    if pub is None or not pub.linked:
        return (f"it has a saved state ({store.image_path(uuid)}) that libvirt cannot restore "
                f"here; a plain start would boot it fresh and lose it. Restore it with "
                f"'fastsave start {name}', or discard the saved state with 'fastsave remove "
                f"{name}' (or 'fastsave start --force-boot {name}').")
    if file_name(name) != pub.name:  # renamed since the save: libvirt cannot restore it
        store.unpublish(uuid)
        return (f"it was renamed after its state was saved ({store.image_path(uuid)}), which "
                f"libvirt cannot restore under the new name. Restore it with 'fastsave start "
                f"{name}', or discard the saved state with 'fastsave remove {name}' (or "
                f"'fastsave start --force-boot {name}').")
    try:
        _check(store, uuid, name, definitions)
    except _Refused as e:
        moved_to = store.quarantine_image(uuid)
        return (f"its saved state was refused before libvirt could restore it: {e}. The image "
                f"was set aside as {moved_to} (kept for inspection, never restored); start the "
                f"domain again to boot it fresh")
    return None


def _started(store: ImageStore, uuid: str, name: str) -> None:
    pub = store.publication(uuid)
    if pub is None:
        return
    if pub.consumed:
        store.remove_image(uuid)
    elif pub.linked and pub.name == file_name(name):
        store.release_to_libvirt(uuid)  # libvirt restored it: the state lives in QEMU now


def hook_main(argv: list[str]) -> int:
    """hook_main([phase, store, uuid, name, definitions_dir]) -> exit code;
    a refusal's reason goes to stderr, which libvirt shows."""
    phase, store_dir, uuid, name, definitions = argv
    uuid = uuid.lower()
    why: str | None
    try:
        with ImageStore(store_dir) as store:
            try:
                with store.lock(uuid, name):
                    if phase == "started":
                        _started(store, uuid, name)
                        return 0
                    why = _prepare(store, uuid, name, definitions)
            except DomainBusy:
                if phase == "started":
                    return 0
                why = "a fastsave operation on it is in progress; start it again when it is over"
    except (OSError, StoreError, ImageError, ValueError) as e:
        if phase == "started":
            sys.stderr.write(f"fastsave: domain {name}: {e}\n")
            return 0
        why = f"its saved state cannot be checked ({e})"
    if why is None:
        return 0
    sys.stderr.write(f"fastsave: refusing to start domain {name}: {why}\n")
    return 1

