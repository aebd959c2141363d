"""The domain XML a saved state keeps: what virDomainManagedSaveGetXMLDesc
shows and how virDomainManagedSaveDefineXML replaces it.

Replacing it writes a whole new image: the stream of the old image, checked
chunk by chunk on the way, is written again by the engine with the new XML
and the new running flag into the store's pending file, which is checked and
then renamed over the old image (fsync, rename, fsync directory). Until the
rename the old image is untouched; a failure or a kill at any point before it
leaves the old image as it was (a pending file left by a killed call is
dropped by the next call on the domain). The image format checks the libvirt
header and XML region with a hash in the trailer, so rewriting them in place
(as libvirt does with its own images) would not be atomic.

The new XML is refused unless libvirt's guest-ABI check accepts it against
the saved one (the check `virsh save-image-define` runs, see restore_xml).
Once committed, its digest is recorded beside the binding in the domain's
persistent definition: a restore then starts QEMU from the defined XML (as
libvirt restores a managed save from the XML in its image), and from the
persistent definition for any image XML the host's config did not authorise.
Where the image is published at libvirt's managed-save path (published.py),
the link is replaced by one to the new image, so libvirt's own restore reads
the new XML too.
"""

from __future__ import annotations

import contextlib
import os
import threading
import xml.etree.ElementTree as ET

import libvirt

from . import engine, published, restore_xml
from .errors import FastsaveError, ImageError
from .store import ImageStore
from .virt import fail

__all__ = ["public_xml", "define"]

_SECRET_ATTRS = {"graphics": ("passwd",)}


def public_xml(xml: str, secure: bool) -> str:
    """The saved XML as virDomainManagedSaveGetXMLDesc returns it: without
    VIR_DOMAIN_SAVE_IMAGE_XML_SECURE, without the secrets libvirt's formatter
    leaves out (graphics passwords, HTTP cookie values of network disks)."""
    if secure:
        return xml
    root = ET.fromstring(xml)
    for el in root.iter():
        for attr in _SECRET_ATTRS.get(el.tag, ()):
            el.attrib.pop(attr, None)
    for source in root.iter("source"):
        for cookies in source.findall("cookies"):
            source.remove(cookies)
    return ET.tostring(root, encoding="unicode")


def define(dom: libvirt.virDomain, store: ImageStore, uuid: str, info: engine.ImageInfo,
           image_fd: int, dxml: str, running: bool | None, direct: bool) -> None:
    """Replaces the saved XML (and, unless `running` is None, the state the
    domain comes back in) of the bound image open at `image_fd`. Runs under
    the domain's store lock."""
    name = dom.name()
    try:
        saved = ET.fromstring(info.xml)
    except ET.ParseError as e:
        raise fail(libvirt.VIR_ERR_OPERATION_FAILED,
                   f"the saved XML of domain {name} does not parse: {e}") from e
    try:
        restore_xml.abi_check(dom.connect(), saved, dxml, name, store.scratch_path(uuid))
    except restore_xml.RefusedImage as e:
        err = e.libvirt_error
        if err is None:
            raise fail(libvirt.VIR_ERR_OPERATION_FAILED, str(e)) from None
        raise fail(err.get_error_code(), err.get_error_message() or str(err),
                   err.get_error_domain()) from None
    new_root = ET.fromstring(dxml)  # libvirt parsed it above
    if (new_root.findtext("name") or "").strip() != name:
        raise fail(libvirt.VIR_ERR_INVALID_ARG,
                   f"the new XML names another domain than '{name}'; a saved state keeps its "
                   f"domain's name", libvirt.VIR_FROM_DOMAIN)
    binding = restore_xml.image_binding(info.xml)
    if binding is None:  # the caller found the image bound; this cannot change under the lock
        raise fail(libvirt.VIR_ERR_OPERATION_FAILED, f"the saved state of {name} has no binding")
    new_xml = restore_xml.clean_for_image(dxml, binding)
    was_running = info.was_running if running is None else running
    if new_xml == restore_xml.clean_for_image(info.xml, binding) and was_running == info.was_running:
        return  # libvirt too leaves an unchanged image alone
    _rewrite(store, uuid, info, image_fd, new_xml, was_running, direct)
    before = restore_xml.defined_digest(dom)
    restore_xml.bind_definition(dom, binding, restore_xml.xml_digest(new_xml))
    try:
        store.commit_pending(uuid)
    except BaseException:
        with contextlib.suppress(libvirt.libvirtError):
            restore_xml.bind_definition(dom, binding, before)
        with contextlib.suppress(OSError):
            store.discard_pending(uuid)
        raise
    # libvirt's link at its managed-save path (published.py) still leads to
    # the old file: replaced atomically by one to the new image
    published.publish(dom, store, uuid)


def _rewrite(store: ImageStore, uuid: str, info: engine.ImageInfo, image_fd: int,
             new_xml: str, was_running: bool, direct: bool) -> None:
    """Writes the store's pending file: the old image's stream (checked on the
    way) with the new XML and running flag, and checks it."""
    path = store.image_path(uuid)
    pending = store.pending_path(uuid)
    store.discard_pending(uuid)
    mode: engine.Mode = "auto" if info.auto_mode else info.codec
    channels = getattr(info, "channels", 1)  # several: QEMU's multifd channels, one pipe each
    pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(channels)]
    reads, writes = [p[0] for p in pipes], [p[1] for p in pipes]
    fed: dict[str, BaseException] = {}

    def feed() -> None:
        try:
            engine.restore_stream(image_fd, writes if channels > 1 else writes[0], name=path)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            fed["error"] = e
        finally:
            for w in writes:
                os.close(w)  # the save sees EOF; a short stream is caught below

    feeder = threading.Thread(target=feed, name="fastsave-define-feed", daemon=True)
    feeder.start()
    try:
        try:
            engine.save_stream(reads if channels > 1 else reads[0], pending, mode=mode,
                               level=info.level if info.codec == "zstd" else None,
                               chunk_size=info.chunk_size, direct=direct, xml=new_xml,
                               name=info.name, uuid=info.uuid, was_running=was_running)
        finally:
            for r in reads:
                os.close(r)  # a failed save ends the feeder with EPIPE
            feeder.join()
        if "error" in fed:
            raise fed["error"]
        new = engine.inspect(pending)
        same = (new.stream_length, getattr(new, "channel_lengths", None), new.xml, new.was_running)
        if same != (info.stream_length, getattr(info, "channel_lengths", None), new_xml, was_running):
            raise ImageError(f"the rewritten image {pending} does not match the saved state")
    except BaseException as e:
        with contextlib.suppress(OSError):
            store.discard_pending(uuid)
        if isinstance(e, (FastsaveError, OSError)):
            raise fail(libvirt.VIR_ERR_OPERATION_FAILED,
                       f"cannot rewrite the saved state of domain {info.name}: {e}; the saved "
                       f"state is kept as it was") from e
        raise
