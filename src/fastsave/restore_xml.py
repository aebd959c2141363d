"""What a restore starts QEMU with, and when an image may not be restored.

An image is data from a file, so it never decides how QEMU is started: a
restore starts QEMU from the domain's *current persistent definition* (the
host's config), plus what migration needs (`-incoming defer` and a one-time
restore token in the metadata, by which the libvirt hook recognises
fastsave's own start). The domain XML inside the image is used only

- to check that the image belongs to this definition: a save writes a fresh
  binding id into the persistent definition's metadata and into the image's
  XML; a definition created after the save (undefine + define, same name or
  UUID) does not carry it, so its image is foreign and never restored;
- to check that the definition still describes the same guest hardware (the
  guest ABI): libvirt's own check, the one `virsh save-image-define` runs,
  applied to a header-only save file holding the image's XML. Changes libvirt
  tolerates (`<on_crash>`, a disk's source path, a seclabel) are allowed and
  take effect; changes to the hardware are refused with libvirt's reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import uuid as _uuid
import xml.etree.ElementTree as ET

import libvirt

from .engine import ImageInfo

__all__ = ["RefusedImage", "ForeignImage", "for_restore", "check_binding", "clean_for_image", "new_binding",
           "bind_definition", "unbind_definition", "definition_binding", "image_binding",
           "xml_digest", "defined_digest", "abi_check",
           "QEMU_NS", "TOKEN_NS", "BIND_NS"]

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
TOKEN_NS = "urn:fastsave:restore:1"
BIND_NS = "urn:fastsave:saved:1"
ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("fastsave", TOKEN_NS)
ET.register_namespace("fastsave-saved", BIND_NS)

# libvirt's save image header (native endian): magic, version 2, data_len,
# was_running, format (0 raw), cookieOffset, 14 unused words.
_LIBVIRT_MAGIC = b"LibvirtQemudSave"
_HEADER = struct.Struct("=16s5I56x")


class RefusedImage(Exception):
    """The image may not be restored into the domain as it is defined now.
    `libvirt_error`: libvirt's refusal, when libvirt's ABI check refused."""

    libvirt_error: libvirt.libvirtError | None = None


class ForeignImage(RefusedImage):
    """The image was taken from an earlier definition of the domain (or from
    no known definition): it is not this domain's saved state."""


# -- binding an image to the definition it was taken from ---------------------

def new_binding() -> str:
    return _uuid.uuid4().hex


def bind_definition(dom: libvirt.virDomain, binding: str, defined: str | None = None) -> None:
    """Records the binding in the persistent definition (its metadata).
    `defined`: the digest (xml_digest) of an image XML that a writable
    connection defined for the saved state (virDomainManagedSaveDefineXML);
    only an image whose XML has this digest is restored from its own XML."""
    extra = f" defined='{defined}'" if defined else ""
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, f"<saved image='{binding}'{extra}/>",
                    "fastsave-saved", BIND_NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG)


def xml_digest(xml: str) -> str:
    return hashlib.sha256(xml.encode()).hexdigest()


def defined_digest(dom: libvirt.virDomain) -> str | None:
    """The digest of the image XML defined for the saved state, if any."""
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, BIND_NS,
                            libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        return ET.fromstring(text).get("defined") or None
    except (libvirt.libvirtError, ET.ParseError):
        return None


def unbind_definition(dom: libvirt.virDomain) -> None:
    """Best effort: a stale binding is harmless (no image carries it)."""
    with contextlib.suppress(libvirt.libvirtError):
        if definition_binding(dom) is not None:
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, BIND_NS,
                            libvirt.VIR_DOMAIN_AFFECT_CONFIG)


def definition_binding(dom: libvirt.virDomain) -> str | None:
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, BIND_NS,
                            libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise
    try:
        return ET.fromstring(text).get("image") or None
    except ET.ParseError:
        return None


def _binding_of(root: ET.Element) -> str | None:
    found = [el.get("image") for el in root.findall(f"./metadata/{{{BIND_NS}}}saved")]
    return found[0] if len(found) == 1 and found[0] else None


def image_binding(xml: str) -> str | None:
    """The binding an image's XML carries (None when absent, ambiguous or unparsable)."""
    try:
        return _binding_of(ET.fromstring(xml))
    except ET.ParseError:
        return None


# -- the XML an image keeps ------------------------------------------------------

def _is_ours(el: ET.Element) -> bool:
    return el.tag == f"{{{QEMU_NS}}}arg" and el.get("value") in ("-incoming", "defer")


def clean_for_image(xml: str, binding: str) -> str:
    """A running domain's XML as an image keeps it: without what a restore
    added, with the binding to the definition it is taken from."""
    root = ET.fromstring(xml)
    for cmd in root.findall(f"{{{QEMU_NS}}}commandline"):
        args = list(cmd)
        for i in range(len(args) - 1):
            if args[i].get("value") == "-incoming" and args[i + 1].get("value") == "defer" \
                    and _is_ours(args[i]) and _is_ours(args[i + 1]):
                cmd.remove(args[i])
                cmd.remove(args[i + 1])
                break
        if len(cmd) == 0:
            root.remove(cmd)
    meta = root.find("metadata")
    if meta is None:
        meta = ET.SubElement(root, "metadata")
    for old in [*meta.findall(f"{{{TOKEN_NS}}}restore"), *meta.findall(f"{{{BIND_NS}}}saved")]:
        meta.remove(old)
    ET.SubElement(meta, f"{{{BIND_NS}}}saved", image=binding)
    return ET.tostring(root, encoding="unicode")


# -- the XML a restore starts QEMU with -----------------------------------------

def check_binding(info: ImageInfo, dom: libvirt.virDomain) -> None:
    """Raises ForeignImage unless the image was taken from the domain's
    current definition."""
    if info.uuid is None or str(info.uuid) != dom.UUIDString():
        raise ForeignImage("the image belongs to another domain (UUID differs)")
    theirs, mine = image_binding(info.xml), definition_binding(dom)
    if theirs is None or theirs != mine:
        raise ForeignImage("the image was not taken from the domain's current definition (it "
                           "was defined again after the save, or the image comes from elsewhere)")


def _abi_check(conn: libvirt.virConnect, image_root: ET.Element, config_xml: str,
               config_name: str, scratch: str) -> None:
    """libvirt's guest-ABI check of the definition against the image's XML."""
    image_root = ET.fromstring(ET.tostring(image_root))
    name = image_root.find("name")
    if name is not None:  # a rename is not a hardware change
        name.text = config_name
    text = ET.tostring(image_root, encoding="unicode").encode() + b"\0"
    room = len(text) + len(config_xml.encode()) + 65536  # libvirt rewrites the XML in place
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_HEADER.pack(_LIBVIRT_MAGIC, 2, room, 0, 0, 0) + text + bytes(room - len(text)))
        conn.saveImageDefineXML(scratch, config_xml, 0)
    except libvirt.libvirtError as e:
        refused = RefusedImage(
            f"the domain's definition no longer describes the saved guest's hardware: "
            f"{e.get_error_message()}. Change the definition back (the saved one is shown by "
            f"'fastsave inspect --xml IMAGE'), then start again; the saved state is kept")
        refused.libvirt_error = e
        raise refused from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scratch)


abi_check = _abi_check  # also virDomainManagedSaveDefineXML's check


def for_restore(info: ImageInfo, dom: libvirt.virDomain, token: str, scratch: str) -> str:
    """The domain's current definition, checked against the image, with what
    an incoming migration needs. `scratch` is a private path for the check."""
    try:
        image = ET.fromstring(info.xml)
    except ET.ParseError as e:
        raise RefusedImage(f"the image's domain XML does not parse: {e}") from e
    if image.tag != "domain":
        raise RefusedImage("the image's XML is not a domain")
    check_binding(info, dom)
    config_xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    config = ET.fromstring(config_xml)
    if defined_digest(dom) == xml_digest(info.xml):
        # virDomainManagedSaveDefineXML replaced the saved XML (ABI-checked
        # then) and the host's config authorised it: restore into it, as
        # libvirt does, under the domain's current name.
        name = (config.findtext("name") or "").strip()
        config = ET.fromstring(info.xml)
        el = config.find("name")
        if el is not None:
            el.text = name
        config_xml = ET.tostring(config, encoding="unicode")
    _abi_check(dom.connect(), image, config_xml, (config.findtext("name") or "").strip(), scratch)
    cmd = config.find(f"{{{QEMU_NS}}}commandline")
    if cmd is None:
        cmd = ET.SubElement(config, f"{{{QEMU_NS}}}commandline")
    for arg in ("-incoming", "defer"):
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=arg)
    meta = config.find("metadata")
    if meta is None:
        meta = ET.SubElement(config, "metadata")
    ET.SubElement(meta, f"{{{TOKEN_NS}}}restore", token=token)
    return ET.tostring(config, encoding="unicode")
