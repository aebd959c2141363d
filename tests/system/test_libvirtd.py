"""Managed save under the system libvirtd: read-only connections, plain libvirt
starts, and autostart across a daemon restart (a simulated host boot)."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import libvirt
import pytest

import fastsave
from fastsave import published
from testkit import guest
from testkit.system_daemon import restart_libvirtd

pytestmark = [pytest.mark.qemu, pytest.mark.root]


def test_round_trip_under_libvirtd(make_system_guest):
    mem = 128
    dom = make_system_guest(mem)
    dom.suspend()
    ram, regs, st = guest.ram_sha256(dom, mem), guest.registers(dom), guest.read_state(dom)
    fastsave.managed_save(dom)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    assert fastsave.has_managed_save_image(dom) == 1
    fastsave.start(dom)
    assert (guest.ram_sha256(dom, mem), guest.registers(dom), guest.read_state(dom)) == (ram, regs, st)
    dom.resume()
    assert guest.read_state(dom).boot_id == st.boot_id


def test_read_only_connection(make_system_guest, system_libvirtd):
    dom = make_system_guest(64)
    ro = libvirt.openReadOnly(system_libvirtd)
    rdom = ro.lookupByUUIDString(dom.UUIDString())
    for call in (fastsave.managed_save, fastsave.managed_save_remove, fastsave.start):
        with pytest.raises(libvirt.libvirtError) as ei:
            call(rdom)
        assert ei.value.get_error_code() == libvirt.VIR_ERR_OPERATION_DENIED
    assert dom.isActive()
    assert fastsave.has_managed_save_image(rdom) == 0  # works read-only
    fastsave.managed_save(dom)
    assert fastsave.has_managed_save_image(rdom) == 1
    with pytest.raises(libvirt.libvirtError) as ei:
        fastsave.managed_save_remove(rdom)
    assert ei.value.get_error_code() == libvirt.VIR_ERR_OPERATION_DENIED
    assert fastsave.has_managed_save_image(dom) == 1
    ro.close()


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True)


def test_plain_libvirt_start_is_refused_with_a_pointer_to_fastsave(make_system_guest):
    """An image libvirt cannot restore (not published: a format this libvirt
    cannot read, another file system): plain starts are refused."""
    dom = make_system_guest(64)
    fastsave.managed_save(dom)
    fastsave.image_store(dom.connect()).unpublish(dom.UUIDString())  # as where libvirt cannot read it
    r = virsh("start", dom.name())
    assert r.returncode != 0
    assert "fastsave start" in r.stderr and "saved state" in r.stderr
    assert not dom.isActive()
    with pytest.raises(libvirt.libvirtError, match="fastsave"):
        dom.create()  # any libvirt client, not only virsh
    assert fastsave.has_managed_save_image(dom) == 1
    fastsave.start(dom)  # fastsave's own start passes the hook
    assert dom.isActive() and fastsave.has_managed_save_image(dom) == 0
    r = virsh("destroy", dom.name())
    r = virsh("start", dom.name())  # no saved state: plain starts work as always
    assert r.returncode == 0, r.stderr


def host_boot() -> None:
    """libvirtd as at a host boot: /run is empty, so libvirt's marker that it
    has autostarted its domains once since boot is gone, and it runs autostart."""
    Path("/run/libvirt/qemu/autostarted").unlink(missing_ok=True)
    restart_libvirtd()


def test_autostart_restores_a_published_state_by_libvirt_itself(make_system_guest, system_libvirtd):
    dom = make_system_guest(128)
    dom.setAutostart(1)
    name, uuid = dom.name(), dom.UUIDString()
    before = guest.read_state(dom)
    fastsave.managed_save(dom, mode="raw")  # a format every libvirt reads: published
    assert (Path(published.SYSTEM_SAVE_DIR) / f"{name}.save").exists()

    host_boot()  # the host comes back: libvirtd's autostart restores it
    conn = libvirt.open(system_libvirtd)
    dom = conn.lookupByUUIDString(uuid)
    deadline = time.monotonic() + 60
    while not dom.isActive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    after = guest.wait_booted(dom)
    assert after.boot_id == before.boot_id and after.counter > before.counter
    assert not (Path(published.SYSTEM_SAVE_DIR) / f"{name}.save").exists()
    assert fastsave.has_managed_save_image(dom) == 0
    assert fastsave.autostart(conn) == []  # nothing left for fastsave's boot entry point
    dom.setAutostart(0)
    conn.close()


def test_autostart_of_an_unpublished_state_is_refused_and_left_to_fastsave(make_system_guest,
                                                                          system_libvirtd):
    dom = make_system_guest(128)
    dom.setAutostart(1)
    name, uuid = dom.name(), dom.UUIDString()
    before = guest.read_state(dom)
    fastsave.managed_save(dom)
    fastsave.image_store(dom.connect()).unpublish(uuid)  # as where libvirt cannot read it

    host_boot()  # the host comes back: libvirtd's autostart runs, and is refused
    conn = libvirt.open(system_libvirtd)
    dom = conn.lookupByUUIDString(uuid)
    assert not dom.isActive(), "libvirtd's autostart booted the domain fresh"
    assert fastsave.has_managed_save_image(dom) == 1
    r = virsh("start", name)  # a start in between does not boot it fresh either
    assert r.returncode != 0 and "fastsave" in r.stderr

    results = fastsave.autostart(conn)  # the host-boot entry point
    assert results == [(name, None)]
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    after = guest.read_state(dom)
    assert after.boot_id == before.boot_id and after.counter > before.counter
    assert fastsave.has_managed_save_image(dom) == 0
    assert fastsave.autostart(conn) == []  # nothing left to restore
    dom.setAutostart(0)
    conn.close()


def test_boot_command_line(make_system_guest, system_libvirtd):
    import sys

    dom = make_system_guest(64)
    dom.setAutostart(1)
    fastsave.managed_save(dom)
    r = subprocess.run([sys.executable, "-m", "fastsave", "--uri", system_libvirtd, "autostart"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert dom.name() in r.stdout
    assert dom.isActive() and fastsave.has_managed_save_image(dom) == 0
    dom.setAutostart(0)
