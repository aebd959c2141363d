"""libvirt's own start paths and guards with fastsave's saved states
(embedded driver, real TCG guests): an image libvirt can read is published at
libvirt's managed-save path, so a plain start restores it, force-boot
discards it, undefine is refused; rename and re-definition keep the binding.
The embedded driver runs no hooks: the hook's checks are tested in
tests/system/test_libvirt_start.py and tests/managed/test_hook.py."""
from __future__ import annotations

import os
from pathlib import Path

import libvirt
import pytest

import fastsave
from fastsave import published, restore_xml
from testkit import guest

pytestmark = pytest.mark.qemu

MEM = 64


def store(dom):
    return fastsave.image_store(dom.connect())


def image(dom) -> Path:
    return Path(store(dom).image_path(dom.UUIDString()))


def libvirt_file(dom, name: str | None = None) -> Path:
    return Path(published.save_dir(dom.connect())) / published.file_name(name or dom.name())


def is_published(dom) -> bool:
    f = libvirt_file(dom)
    return f.exists() and image(dom).exists() and f.samefile(image(dom))


def zstd_readable(conn) -> bool:
    return published.readable(published.FORMAT_ZSTD, conn.getLibVersion())


def saved(make_guest, mode: str = "raw"):
    """A paused guest saved by fastsave: (dom, ram, registers, boot id)."""
    dom = make_guest(MEM)
    dom.suspend()
    ram, regs = guest.ram_sha256(dom, MEM), guest.registers(dom)
    boot = guest.read_state(dom).boot_id
    fastsave.managed_save(dom, mode=mode)
    assert not dom.isActive()
    return dom, ram, regs, boot


def test_a_plain_libvirt_start_restores_a_published_image(make_guest):
    dom, ram, regs, boot = saved(make_guest)
    assert is_published(dom), "a raw image is readable by every libvirt"
    assert os.stat(image(dom)).st_nlink == 2  # a hard link, no copy
    dom.create()  # libvirt's own start, no fastsave involved
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED  # saved paused, comes back paused
    assert (guest.ram_sha256(dom, MEM), guest.registers(dom)) == (ram, regs)
    assert not libvirt_file(dom).exists(), "libvirt deletes its file after the restore"
    dom.resume()
    assert guest.wait_booted(dom).boot_id == boot
    # fastsave's copy is stale from the moment libvirt took the state, and
    # goes at fastsave's next look
    assert fastsave.has_managed_save_image(dom) == 0
    assert not image(dom).exists()


@pytest.mark.parametrize("mode", ["auto", "zstd"])
def test_compressed_images_are_published_only_where_libvirt_reads_them(make_guest, mode):
    dom, ram, regs, boot = saved(make_guest, mode)
    assert image(dom).exists()
    if not zstd_readable(dom.connect()):  # libvirt < 10.4 (Debian 12: 9.0)
        assert not libvirt_file(dom).exists()
        assert store(dom).publication(dom.UUIDString()) is None
        assert fastsave.has_managed_save_image(dom) == 1
        fastsave.start(dom)  # fastsave's own path restores every format
    else:
        assert is_published(dom)
        dom.create()
    assert (guest.ram_sha256(dom, MEM), guest.registers(dom)) == (ram, regs)
    assert fastsave.has_managed_save_image(dom) == 0 and not libvirt_file(dom).exists()


def test_force_boot_discards_the_state_and_fastsaves_copy(make_guest):
    dom, _, _, boot = saved(make_guest)
    dom.createWithFlags(libvirt.VIR_DOMAIN_START_FORCE_BOOT)
    assert guest.wait_booted(dom).boot_id != boot
    assert not libvirt_file(dom).exists()
    dom.destroy()  # down again: only the "libvirt took it" rule can tell the copy is stale
    assert image(dom).exists() and published.consumed(store(dom), dom.UUIDString())
    assert fastsave.has_managed_save_image(dom) == 0
    assert not image(dom).exists()
    dom.create()
    assert guest.wait_booted(dom).boot_id != boot


def test_libvirt_managed_save_remove_discards_fastsaves_copy(make_guest):
    dom, _, _, boot = saved(make_guest)
    assert dom.hasManagedSaveImage(0) in (0, 1)  # libvirt's cached flag: not to be relied on
    dom.managedSaveRemove(0)
    assert not libvirt_file(dom).exists()
    assert fastsave.has_managed_save_image(dom) == 0 and not image(dom).exists()
    fastsave.start(dom)
    assert guest.wait_booted(dom).boot_id != boot


def test_fastsave_start_and_remove_take_libvirts_link_along(make_guest):
    dom, ram, _, _ = saved(make_guest)
    fastsave.start(dom)  # fastsave's own, faster path
    assert guest.ram_sha256(dom, MEM) == ram
    assert not libvirt_file(dom).exists() and not image(dom).exists()
    dom.resume()
    fastsave.managed_save(dom, mode="raw")
    assert is_published(dom)
    fastsave.managed_save_remove(dom)
    assert not libvirt_file(dom).exists() and not image(dom).exists()
    assert store(dom).publication(dom.UUIDString()) is None


def test_undefine_is_refused_while_published(make_guest):
    dom, _, _, _ = saved(make_guest)
    conn, uuid = dom.connect(), dom.UUIDString()
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    with pytest.raises(libvirt.libvirtError, match="managed save image exists"):
        dom.undefine()
    assert is_published(dom)
    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)  # virsh undefine --managed-save
    assert not libvirt_file(dom).exists()
    # the domain is gone; its stale copy waits in the store until a domain
    # of that UUID is looked at again, and is never restored
    dom = conn.defineXML(xml)
    assert dom.UUIDString() == uuid
    assert fastsave.has_managed_save_image(dom) == 0
    assert not image(dom).exists()


def test_undefine_of_an_unpublished_image_keeps_it_tracked(make_guest):
    """An image libvirt cannot read (zstd under libvirt < 10.4; one on
    another file system) is invisible to libvirt, so libvirt's undefine
    succeeds. The image stays in the store under the domain's UUID; a
    definition created later never restores it: it is set aside."""
    dom = make_guest(MEM)
    before = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    boot = guest.read_state(dom).boot_id
    fastsave.managed_save(dom, mode="raw")
    conn, uuid = dom.connect(), dom.UUIDString()
    st = store(dom)
    st.unpublish(uuid)  # as if libvirt could not read it
    dom.undefine()
    assert (uuid, str(image(dom))) in st.list_images(), "still tracked by UUID"
    dom = conn.defineXML(before)
    assert fastsave.has_managed_save_image(dom) == 0
    assert any(u == uuid for u, _ in st.list_orphans())
    fastsave.start(dom)
    assert guest.wait_booted(dom).boot_id != boot


def test_rename_the_state_follows_the_domain_through_fastsave_start(make_guest):
    """libvirt accepts a rename of a saved domain and leaves its file under the
    old name; it would refuse to restore it under the new one (the image's XML
    names the old). fastsave withdraws that link and restores by UUID."""
    dom, ram, regs, boot = saved(make_guest)
    old = libvirt_file(dom)
    new_name = dom.name() + "-renamed"
    dom.rename(new_name, 0)
    dom = dom.connect().lookupByName(new_name)
    assert old.exists()
    assert fastsave.has_managed_save_image(dom) == 1
    assert not old.exists() and not libvirt_file(dom).exists()
    fastsave.start(dom)
    assert dom.name() == new_name
    assert (guest.ram_sha256(dom, MEM), guest.registers(dom)) == (ram, regs)
    dom.resume()
    assert guest.wait_booted(dom).boot_id == boot


def test_a_redefined_domain_never_restores_the_old_state(make_guest):
    dom, _, _, boot = saved(make_guest)
    conn = dom.connect()
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).replace(restore_xml.BIND_NS, "urn:example:x")
    dom = conn.defineXML(xml)  # a new definition, same name and UUID
    assert fastsave.has_managed_save_image(dom) == 0
    assert not libvirt_file(dom).exists(), "set aside where libvirt cannot find it either"
    assert len(store(dom).list_orphans()) >= 1
    dom.create()
    assert guest.wait_booted(dom).boot_id != boot


def test_an_image_on_another_file_system_is_not_published(make_guest, tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    image_dir = shm / f"fastsave-test-{os.getpid()}"
    dom = make_guest(MEM)
    try:
        fastsave.managed_save(dom, mode="raw", image_dir=str(image_dir))
        assert (image_dir / f"{dom.UUIDString()}.fsimg").exists()
        assert not libvirt_file(dom).exists()
        fastsave.start(dom, image_dir=str(image_dir))
        assert dom.isActive()
    finally:
        for p in image_dir.glob("*"):
            p.unlink()
        for p in image_dir.glob(".*"):
            p.unlink()
        image_dir.rmdir()


def test_a_publish_cut_short_leaves_the_state_fastsaves(make_guest):
    """A process killed after writing the record and before the link is in
    place (the record still says linked: false) must not pass for libvirt
    having taken the state: the image stays, unpublished, and restores."""
    dom, ram, _, _ = saved(make_guest)
    st, uuid = store(dom), dom.UUIDString()
    record = Path(st.directory) / f".{uuid}.published"
    text = record.read_text()
    assert '"linked": true' in text
    libvirt_file(dom).unlink()
    record.write_text(text.replace('"linked": true', '"linked": false'))
    assert not published.consumed(st, uuid)
    assert fastsave.has_managed_save_image(dom) == 1
    fastsave.start(dom)
    assert guest.ram_sha256(dom, MEM) == ram
    assert not record.exists() and not image(dom).exists()
