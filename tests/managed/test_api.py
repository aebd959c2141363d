"""Managed save end to end on the embedded driver: real QEMU guests under TCG."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import libvirt
import pytest

import fastsave
from fastsave import engine
from fastsave.worker import EngineProcess
from testkit import guest
from testkit.engine_io import restore_bytes, save_bytes

pytestmark = pytest.mark.qemu

SAVE_PAUSED = libvirt.VIR_DOMAIN_SAVE_PAUSED
SAVE_RUNNING = libvirt.VIR_DOMAIN_SAVE_RUNNING
BYPASS = libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE
START_PAUSED = libvirt.VIR_DOMAIN_START_PAUSED
FORCE_BOOT = libvirt.VIR_DOMAIN_START_FORCE_BOOT


def state(dom) -> int:
    return dom.state()[0]


def snapshot(dom, mem_mib: int) -> tuple[str, str, guest.GuestState]:
    """RAM hash, registers and guest counters of a paused domain."""
    assert state(dom) == libvirt.VIR_DOMAIN_PAUSED
    return guest.ram_sha256(dom, mem_mib), guest.registers(dom), guest.read_state(dom)


def image_path(dom) -> Path:
    return Path(fastsave.image_store(dom.connect()).image_path(dom.UUIDString()))


@pytest.mark.parametrize("mode,flags", [
    ("auto", 0), ("raw", 0), ("zstd", 0), ("auto", BYPASS), ("raw", BYPASS),
])
def test_paused_domain_round_trip_is_exact(make_guest, mode, flags):
    mem = 128
    dom = make_guest(mem)
    dom.suspend()
    before = snapshot(dom, mem)
    assert fastsave.managed_save(dom, flags, mode=mode) == 0
    assert state(dom) == libvirt.VIR_DOMAIN_SHUTOFF
    assert fastsave.has_managed_save_image(dom) == 1
    info = engine.inspect(image_path(dom))
    assert info.uuid is not None and str(info.uuid) == dom.UUIDString() and info.name == dom.name()
    assert not info.was_running and info.codec == ("raw" if mode == "raw" else "zstd")

    assert fastsave.start(dom) == 0
    assert state(dom) == libvirt.VIR_DOMAIN_PAUSED  # saved paused, comes back paused
    assert snapshot(dom, mem) == before  # RAM, registers, counter: byte for byte
    assert fastsave.has_managed_save_image(dom) == 0 and not image_path(dom).exists()
    dom.resume()
    after = guest.wait_booted(dom)
    assert after.boot_id == before[2].boot_id  # no reboot
    later = guest.read_state(dom)
    assert later.counter > before[2].counter  # it goes on counting from where it was


def test_running_domain_comes_back_running(make_guest):
    dom = make_guest(128)
    st0 = guest.read_state(dom)
    fastsave.managed_save(dom)
    assert state(dom) == libvirt.VIR_DOMAIN_SHUTOFF
    assert engine.inspect(image_path(dom)).was_running
    fastsave.start(dom, START_PAUSED)
    assert state(dom) == libvirt.VIR_DOMAIN_PAUSED
    saved = guest.read_state(dom)
    assert saved.boot_id == st0.boot_id and saved.counter >= st0.counter
    dom.resume()
    fastsave.managed_save(dom)
    fastsave.start(dom)
    assert state(dom) == libvirt.VIR_DOMAIN_RUNNING
    now = guest.read_state(dom)
    assert now.boot_id == st0.boot_id and now.counter > saved.counter


def test_save_flags_override_the_state(make_guest):
    dom = make_guest(64)
    fastsave.managed_save(dom, SAVE_PAUSED)
    fastsave.start(dom)
    assert state(dom) == libvirt.VIR_DOMAIN_PAUSED
    fastsave.managed_save(dom, SAVE_RUNNING)
    fastsave.start(dom)
    assert state(dom) == libvirt.VIR_DOMAIN_RUNNING


def test_image_store_is_private(make_guest):
    dom = make_guest(64)
    fastsave.managed_save(dom)
    p = image_path(dom)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert stat.S_IMODE(p.parent.stat().st_mode) == 0o700
    assert p.name == dom.UUIDString() + ".fsimg"  # named by UUID, never by domain name


def test_has_image_remove_and_stale_image(make_guest):
    dom = make_guest(64)
    assert fastsave.has_managed_save_image(dom) == 0
    fastsave.managed_save(dom)
    p = image_path(dom)
    copy = p.read_bytes()
    assert fastsave.has_managed_save_image(dom) == 1
    assert fastsave.managed_save_remove(dom) == 0
    assert fastsave.has_managed_save_image(dom) == 0 and not p.exists()
    assert fastsave.managed_save_remove(dom) == 0  # removing a missing image succeeds
    fastsave.start(dom)  # no image: a normal boot
    guest.wait_booted(dom)
    # An image next to a running domain is stale by definition.
    p.write_bytes(copy)
    os.chmod(p, 0o600)
    assert fastsave.has_managed_save_image(dom) == 0
    assert not p.exists()


def test_force_boot_discards_the_image(make_guest):
    dom = make_guest(64)
    st0 = guest.read_state(dom)
    fastsave.managed_save(dom)
    fastsave.start(dom, FORCE_BOOT)
    assert state(dom) == libvirt.VIR_DOMAIN_RUNNING
    st1 = guest.wait_booted(dom)
    assert st1.boot_id != st0.boot_id  # a fresh boot
    assert fastsave.has_managed_save_image(dom) == 0


def test_corrupt_image_fails_start_and_is_kept(make_guest):
    dom = make_guest(64)
    fastsave.managed_save(dom, mode="raw")
    p = image_path(dom)
    info = engine.inspect(p)
    b = bytearray(p.read_bytes())
    b[info.payload_offset + info.payload_length // 2] ^= 0xFF
    p.write_bytes(b)
    with pytest.raises(libvirt.libvirtError) as ei:
        fastsave.start(dom)
    e = ei.value
    assert e.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED
    assert "chunk" in str(e) and "kept" in str(e) and "FORCE_BOOT" in str(e)
    assert state(dom) == libvirt.VIR_DOMAIN_SHUTOFF
    assert fastsave.has_managed_save_image(dom) == 1 and p.exists()
    fastsave.start(dom, FORCE_BOOT)
    guest.wait_booted(dom)
    assert fastsave.has_managed_save_image(dom) == 0 and not p.exists()


def test_truncated_image_is_refused_before_qemu_starts(make_guest):
    dom = make_guest(64)
    fastsave.managed_save(dom)
    p = image_path(dom)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(libvirt.libvirtError, match="truncated"):
        fastsave.start(dom)
    assert state(dom) == libvirt.VIR_DOMAIN_SHUTOFF and p.exists()


def test_image_xml_with_qemu_arguments_never_reaches_qemu(make_guest):
    """QEMU is started from the domain's definition: arguments forged into the
    image's XML have no effect (more forgeries: test_managed_safety.py)."""
    dom = make_guest(64)
    fastsave.managed_save(dom)
    p = image_path(dom)
    info = engine.inspect(p)
    evil = info.xml.replace("</domain>", "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/"
                            "domain/qemu/1.0'><qemu:arg value='-evil'/></qemu:commandline></domain>")
    stream = restore_bytes(p)
    save_bytes(stream, p, xml=evil, name=info.name, uuid=info.uuid)  # a forged image, valid otherwise
    fastsave.start(dom)
    assert state(dom) == libvirt.VIR_DOMAIN_RUNNING and not p.exists()
    assert "-evil" not in dom.XMLDesc(0)


def test_managed_save_a_domain_twice_is_refused_when_shut_off(make_guest):
    dom = make_guest(64)
    fastsave.managed_save(dom)
    with pytest.raises(libvirt.libvirtError) as ei:
        fastsave.managed_save(dom)
    assert ei.value.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
    assert fastsave.has_managed_save_image(dom) == 1  # the good image is untouched


def test_start_of_a_running_domain_is_refused(make_guest):
    dom = make_guest(64)
    with pytest.raises(libvirt.libvirtError) as ei:
        fastsave.start(dom)
    assert ei.value.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID


@pytest.mark.parametrize("flags, direct, want_save, want_restore", [
    (0, None, True, False),            # defaults: O_DIRECT save, readahead restore
    (libvirt.VIR_DOMAIN_START_BYPASS_CACHE, None, True, True),
    (0, True, True, True),
    (0, False, False, False),
])
def test_cache_use_of_save_and_start(make_guest, monkeypatch, flags, direct, want_save, want_restore):
    """What the engine reports it did (Stats.direct), for the options and flags."""
    dom = make_guest(64)
    engines = []
    for op in ("save", "restore"):
        real = getattr(EngineProcess, op).__func__

        def spy(cls, *a, _real=real, _op=op, **kw):
            e = _real(cls, *a, **kw)
            engines.append((_op, e))
            return e
        monkeypatch.setattr(EngineProcess, op, classmethod(spy))
    kw = {} if direct is None else {"direct": direct}
    fastsave.managed_save(dom, **kw)
    fastsave.start(dom, flags, **kw)
    assert dom.isActive()
    got = {op: e.result().direct for op, e in engines}
    assert got == {"save": want_save, "restore": want_restore}
