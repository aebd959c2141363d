"""Stale or foreign state never comes back, and the image never steers QEMU
(embedded driver, real TCG guests). Each test names the fault it injects."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import libvirt
import pytest

import fastsave
from fastsave import engine, restore_xml, saving
from testkit import guest
from testkit.background import save_in_thread

pytestmark = pytest.mark.qemu

MEM = 64


def image(dom) -> Path:
    return Path(fastsave.image_store(dom.connect()).image_path(dom.UUIDString()))


def store_dir(dom) -> Path:
    return Path(fastsave.image_store(dom.connect()).directory)


def mark(dom) -> Path:
    return store_dir(dom) / f".{dom.UUIDString()}.saving"


def assert_invariant(dom) -> None:
    """Never a running domain beside its image."""
    assert not (dom.isActive() and image(dom).exists()), "a running domain beside its image"


def saved_paused(make_guest, mem: int = MEM):
    dom = make_guest(mem)
    dom.suspend()
    ram = guest.ram_sha256(dom, mem)
    boot = guest.read_state(dom).boot_id
    fastsave.managed_save(dom, mode="raw")
    assert image(dom).exists() and not dom.isActive()
    return dom, ram, boot


# -- item 2: stopping the domain fails after the image is committed ------------

def test_destroy_failing_after_commit_keeps_the_image_and_the_mark(make_guest, monkeypatch):
    dom = make_guest(MEM)
    dom.suspend()
    ram = guest.ram_sha256(dom, MEM)
    real = libvirt.virDomain.destroy

    def busy(self, *a):
        raise libvirt.libvirtError("Failed to terminate process: Device or resource busy")

    monkeypatch.setattr(libvirt.virDomain, "destroy", busy)
    monkeypatch.setattr(saving, "STOP_TIMEOUT", 1.0)
    with pytest.raises(libvirt.libvirtError) as ei:
        fastsave.managed_save(dom, mode="raw")
    msg = str(ei.value)
    assert "is saved" in msg and "complete and durable" in msg and "next fastsave call" in msg
    assert dom.isActive() and dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    assert image(dom).exists() and mark(dom).exists()
    monkeypatch.setattr(libvirt.virDomain, "destroy", real)
    # The next call finishes the save: the domain stops, the image stays.
    assert fastsave.has_managed_save_image(dom) == 1
    assert not dom.isActive() and not mark(dom).exists()
    fastsave.start(dom)
    assert guest.ram_sha256(dom, MEM) == ram


def test_domain_destroyed_by_someone_else_after_commit_counts_as_saved(make_guest, monkeypatch):
    dom = make_guest(MEM)
    boot = guest.read_state(dom).boot_id
    store_cls = type(fastsave.image_store(dom.connect()))
    real = store_cls.commit_pending

    def commit_then_destroy(self, uuid):
        real(self, uuid)
        dom.connect().lookupByUUIDString(uuid).destroy()

    monkeypatch.setattr(store_cls, "commit_pending", commit_then_destroy)
    assert fastsave.managed_save(dom, mode="raw") == 0
    monkeypatch.undo()
    assert not dom.isActive() and image(dom).exists() and not mark(dom).exists()
    fastsave.start(dom)
    assert guest.wait_booted(dom).boot_id == boot


# -- item 1 (in-process form): a committed image with the domain left running --

def test_start_of_an_active_domain_removes_its_image(make_guest):
    """An image beside a running domain (booted behind fastsave's back) is
    stale: start removes it, then refuses as libvirt does."""
    dom, _, _ = saved_paused(make_guest)
    kept = image(dom).read_bytes()
    dom.create()  # no hook on the embedded driver: a plain boot behind our back
    image(dom).write_bytes(kept)
    os.chmod(image(dom), 0o600)
    with pytest.raises(libvirt.libvirtError, match="already running"):
        fastsave.start(dom)
    assert not image(dom).exists()
    assert_invariant(dom)


# -- items 4 and 5: undefine + define again; rename -------------------------------

@pytest.mark.parametrize("xml_from", ["before-save", "after-save"])
def test_redefined_domain_never_restores_the_old_state(make_guest, xml_from):
    dom = make_guest(MEM)
    conn, uuid = dom.connect(), dom.UUIDString()
    boot = guest.read_state(dom).boot_id
    before = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    fastsave.managed_save(dom, mode="raw")
    xml = before if xml_from == "before-save" else dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    if xml_from == "after-save":  # a fresh definition of the same name and UUID
        xml = xml.replace(restore_xml.BIND_NS, "urn:example:other")
    # as where libvirt cannot read the image: libvirt refuses to undefine a published state
    fastsave.image_store(conn).unpublish(uuid)
    dom.undefine()
    dom = conn.defineXML(xml)
    assert dom.UUIDString() == uuid
    assert fastsave.has_managed_save_image(dom) == 0
    assert not image(dom).exists()
    orphans = fastsave.image_store(conn).list_orphans()
    assert any(uuid in str(p) for p in orphans), "the old state is set aside, not deleted"
    fastsave.start(dom)
    assert guest.wait_booted(dom).boot_id != boot, "booted fresh, not from the old state"
    assert_invariant(dom)


def test_rename_while_saved_restores_under_the_new_name(make_guest):
    dom, ram, boot = saved_paused(make_guest)
    new = dom.name() + "-renamed"
    dom.rename(new, 0)
    dom = dom.connect().lookupByName(new)
    assert fastsave.has_managed_save_image(dom) == 1
    fastsave.start(dom)
    assert dom.name() == new
    assert guest.ram_sha256(dom, MEM) == ram
    dom.resume()
    assert guest.wait_booted(dom).boot_id == boot


# -- item 6: the image is not trusted beyond the host's config ---------------------

def _forge(dom, tmp_path: Path, edit) -> None:
    """Rewrites the domain's image with edited XML (same stream, same binding):
    what anyone who can write an image file could produce."""
    path = image(dom)
    info = engine.inspect(path)
    stream = tmp_path / "stream"
    with open(stream, "wb") as out:
        engine.restore_stream(path, out.fileno())
    forged = edit(info.xml)
    assert forged != info.xml
    path.unlink()
    with open(stream, "rb") as src:
        engine.save_stream(src.fileno(), path, mode="raw", xml=forged, name=info.name,
                           uuid=str(info.uuid), was_running=info.was_running)
    os.chmod(path, 0o600)


def _add_devices(extra: str):
    return lambda xml: xml.replace("</devices>", extra + "</devices>", 1)


def _qemu_cmdline(dom) -> str:
    out = subprocess.run(["pgrep", "-af", f"guest={dom.name()},"], capture_output=True,
                         text=True).stdout
    assert out, "no QEMU found for the domain"
    return out


FORGED = {
    # refused: libvirt's ABI check sees hardware the definition lacks
    "serial-to-host-file": (_add_devices(
        "<serial type='file'><source path='{tmp}/written-by-qemu'/><target port='0'/></serial>"),
        "refused"),
    "extra-interface": (_add_devices("<interface type='user'><model type='e1000'/></interface>"),
                        "refused"),
    # tolerated by the ABI check, and without effect: QEMU starts from the definition
    "seclabel-none": (lambda xml: xml.replace("</devices>", "</devices><seclabel type='none'/>"),
                      "ignored"),
    "second-qemu-commandline": (lambda xml: xml.replace(
        "</domain>",
        f"<qemu:commandline xmlns:qemu='{restore_xml.QEMU_NS}'><qemu:arg value='-device'/>"
        "<qemu:arg value='loader,file=/etc/hostname,addr=0x3000000,force-raw=on'/>"
        "</qemu:commandline></domain>"), "ignored"),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_image_xml_never_reaches_qemu(make_guest, tmp_path, case):
    edit, outcome = FORGED[case]
    dom, ram, _ = saved_paused(make_guest)
    # Every forgery also carries a harmless marker: had QEMU been started from
    # the image's XML, the live XML would show it.
    _forge(dom, tmp_path, lambda xml: edit(xml).replace("{tmp}", str(tmp_path)).replace(
        "</name>", "</name><description>forged</description>", 1))
    if outcome == "refused":
        with pytest.raises(libvirt.libvirtError, match="no longer describes the saved guest"):
            fastsave.start(dom)
        assert not dom.isActive() and image(dom).exists()
        assert not (tmp_path / "written-by-qemu").exists()
        return
    fastsave.start(dom)
    live = dom.XMLDesc(0)
    assert "forged" not in live, "QEMU was started from the image's XML"
    assert "/etc/hostname" not in live and "/etc/hostname" not in _qemu_cmdline(dom)
    assert guest.ram_sha256(dom, MEM) == ram


def test_definition_edits_libvirt_tolerates_take_effect(make_guest):
    dom, ram, _ = saved_paused(make_guest)
    conn = dom.connect()
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "<on_crash>destroy</on_crash>" in xml
    dom = conn.defineXML(xml.replace("<on_crash>destroy</on_crash>",
                                     "<on_crash>preserve</on_crash>"))
    assert fastsave.has_managed_save_image(dom) == 1
    fastsave.start(dom)
    assert "<on_crash>preserve</on_crash>" in dom.XMLDesc(0)
    assert guest.ram_sha256(dom, MEM) == ram


def test_hardware_change_is_refused_and_the_state_kept(make_guest):
    dom, ram, _ = saved_paused(make_guest)
    conn = dom.connect()
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    grown = xml.replace(f"<memory unit='KiB'>{MEM * 1024}</memory>",
                        f"<memory unit='KiB'>{MEM * 2048}</memory>").replace(
        f"<currentMemory unit='KiB'>{MEM * 1024}</currentMemory>",
        f"<currentMemory unit='KiB'>{MEM * 2048}</currentMemory>")
    assert grown != xml
    dom = conn.defineXML(grown)
    with pytest.raises(libvirt.libvirtError) as ei:
        fastsave.start(dom)
    msg = str(ei.value)
    assert "memory" in msg and "inspect" in msg and "is kept" in msg
    assert not dom.isActive() and image(dom).exists()
    dom = conn.defineXML(xml)  # put the definition back: the state restores
    fastsave.start(dom)
    assert guest.ram_sha256(dom, MEM) == ram


# -- item 11: no unbounded waits ------------------------------------------------------

def test_stalled_engine_is_cancelled_and_rolled_back(make_guest, tmp_path, monkeypatch):
    from fastsave import saving
    fill = tmp_path / "fill.bin"
    fill.write_bytes(os.urandom(64 << 20))
    dom = make_guest(128, fill=str(fill))
    boot = guest.read_state(dom).boot_id
    real_save = saving.EngineProcess.save

    def save_then_stall(*a, **k):
        # the engine child stops as soon as it exists, before QEMU's migrate:
        # however fast the machine, nothing is read from then on
        worker = real_save(*a, **k)
        os.kill(worker.proc.pid, signal.SIGSTOP)
        return worker
    monkeypatch.setattr(saving.EngineProcess, "save", save_then_stall)
    t, box = save_in_thread(dom, mode="raw", direct=False, stall_timeout=2.0)
    t0 = time.monotonic()
    t.join(60)
    assert not t.is_alive(), "the save hung on a stalled engine"
    assert time.monotonic() - t0 < 30
    assert isinstance(box[0], libvirt.libvirtError) and "stalled" in str(box[0])
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert guest.read_state(dom).boot_id == boot
    assert fastsave.has_managed_save_image(dom) == 0


def test_raising_progress_callback_does_not_hang_the_save(make_guest):
    dom = make_guest(MEM)
    calls = []

    def bad(stats) -> None:
        calls.append(stats)
        raise RuntimeError("callback bug")

    done = threading.Event()
    box: list = []

    def run() -> None:
        try:
            box.append(fastsave.managed_save(dom, mode="zstd", progress=bad))
        except libvirt.libvirtError as e:
            box.append(e)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(120), "the save hung after its progress callback raised"
    assert box == [0] and not dom.isActive() and image(dom).exists()


def test_overall_timeout_rolls_back(make_guest, tmp_path):
    fill = tmp_path / "fill.bin"
    fill.write_bytes(os.urandom(96 << 20))
    dom = make_guest(128, fill=str(fill))
    boot = guest.read_state(dom).boot_id
    with pytest.raises(libvirt.libvirtError, match="time limit") as ei:
        fastsave.managed_save(dom, mode="zstd", level=19, timeout=0.5)
    assert "running again" in str(ei.value)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert guest.read_state(dom).boot_id == boot
    assert fastsave.has_managed_save_image(dom) == 0 and not mark(dom).exists()
