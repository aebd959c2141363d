"""The domain XML a restore starts QEMU with, and why an image's XML may be refused.

An image's XML is data from a file: it must describe the same domain as the
host's current persistent config (same UUID, name, type, emulator and
storage) and may not smuggle in QEMU arguments. Only fastsave adds those:
`-incoming defer`, so QEMU waits for the stream, and a restore token in the
metadata, by which the libvirt hook recognises fastsave's own start.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import libvirt

from .engine import ImageInfo

__all__ = ["RefusedImage", "for_restore", "clean_for_image", "QEMU_NS", "TOKEN_NS"]

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
TOKEN_NS = "urn:fastsave:restore:1"
ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("fastsave", TOKEN_NS)


class RefusedImage(Exception):
    """The image's domain XML does not match the domain it would restore."""


def _sources(root: ET.Element) -> list[tuple[str, str, str]]:
    """(device kind, guest target, host source) of storage and passthrough devices."""
    out = []
    for dev in root.findall("./devices/*"):
        if dev.tag not in ("disk", "filesystem", "hostdev", "shmem"):
            continue
        src = dev.find("source")
        host = "" if src is None else "|".join(f"{k}={v}" for k, v in sorted(src.attrib.items())
                                              if k not in ("index", "startupPolicy"))
        tgt = dev.find("target")
        guest = "" if tgt is None else tgt.get("dev", tgt.get("dir", ""))
        out.append((dev.tag, guest, host))
    return sorted(out)


def _text(root: ET.Element, path: str) -> str:
    el = root.find(path)
    return "" if el is None or el.text is None else el.text.strip()


def _qemu_extras(root: ET.Element) -> dict[str, str]:
    """The qemu-namespace elements (QEMU arguments and overrides), canonical."""
    out = {}
    for el in root:
        if el.tag.startswith(f"{{{QEMU_NS}}}"):
            out[el.tag.split("}", 1)[1]] = ET.canonicalize(ET.tostring(el, encoding="unicode"),
                                                           strip_text=True)
    return out


def check_matches(image: ET.Element, config: ET.Element) -> None:
    if image.tag != "domain":
        raise RefusedImage("the image's XML is not a domain")
    mine, theirs = _qemu_extras(image), _qemu_extras(config)
    for tag in sorted(set(mine) | set(theirs)):
        if mine.get(tag) != theirs.get(tag):
            raise RefusedImage(f"the image's XML carries qemu:{tag} that differs from the "
                               f"domain's config; a restore never trusts QEMU arguments from an image")
    checks = [("uuid", _text(image, "uuid"), _text(config, "uuid")),
              ("name", _text(image, "name"), _text(config, "name")),
              ("type", image.get("type", ""), config.get("type", "")),
              ("emulator", _text(image, "./devices/emulator"), _text(config, "./devices/emulator"))]
    for what, got, want in checks:
        if got != want:
            raise RefusedImage(f"the image's domain {what} {got!r} differs from the domain's "
                               f"config ({want!r})")
    if _sources(image) != _sources(config):
        raise RefusedImage("the image's disks or passthrough devices differ from the domain's config")


def _is_ours(el: ET.Element) -> bool:
    return el.tag == f"{{{QEMU_NS}}}arg" and el.get("value") in ("-incoming", "defer")


def clean_for_image(xml: str) -> str:
    """A running domain's XML as an image keeps it: without what a restore added."""
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
    if meta is not None:
        for tok in meta.findall(f"{{{TOKEN_NS}}}restore"):
            meta.remove(tok)
        if len(meta) == 0:
            root.remove(meta)
    return ET.tostring(root, encoding="unicode")


def for_restore(info: ImageInfo, dom: libvirt.virDomain, token: str) -> str:
    try:
        image = ET.fromstring(info.xml)
        config = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE
                                           | libvirt.VIR_DOMAIN_XML_SECURE))
    except ET.ParseError as e:
        raise RefusedImage(f"the image's domain XML does not parse: {e}") from e
    if info.uuid is None or str(info.uuid) != dom.UUIDString():
        raise RefusedImage("the image belongs to another domain (UUID differs)")
    check_matches(image, config)
    cmd = image.find(f"{{{QEMU_NS}}}commandline")
    if cmd is None:
        cmd = ET.SubElement(image, f"{{{QEMU_NS}}}commandline")
    for arg in ("-incoming", "defer"):
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=arg)
    meta = image.find("metadata")
    if meta is None:
        meta = ET.SubElement(image, "metadata")
    ET.SubElement(meta, f"{{{TOKEN_NS}}}restore", token=token)
    return ET.tostring(image, encoding="unicode")
