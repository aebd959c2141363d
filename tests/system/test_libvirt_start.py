"""libvirt's own start paths under the system libvirtd, where the hook runs:
a published image is checked by the hook and then restored by libvirt; a bad
one is refused and set aside; force-boot and re-definition never bring old
state back; what libvirt reports (events, state reasons) for fastsave's save
and restore."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import libvirt
import pytest

import fastsave
from fastsave import published, restore_xml
from testkit import guest

pytestmark = [pytest.mark.qemu, pytest.mark.root]

MEM = 64


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True)


def image(dom) -> Path:
    return Path(fastsave.image_store(dom.connect()).image_path(dom.UUIDString()))


def libvirt_file(name: str) -> Path:
    return Path(published.SYSTEM_SAVE_DIR) / published.file_name(name)


@pytest.fixture
def saved(make_system_guest):
    """saved(mode) -> a paused guest saved by fastsave: (dom, ram, registers, boot id).
    Teardown removes the saved state both ways, so libvirt lets the domain go."""
    doms = []

    def make(mode: str = "raw"):
        dom = make_system_guest(MEM)
        doms.append((dom, dom.name()))
        dom.suspend()
        ram, regs = guest.ram_sha256(dom, MEM), guest.registers(dom)
        boot = guest.read_state(dom).boot_id
        fastsave.managed_save(dom, mode=mode)
        return dom, ram, regs, boot

    yield make
    for dom, name in doms:
        try:
            if dom.isActive():
                dom.destroy()
            fastsave.managed_save_remove(dom)
        except libvirt.libvirtError:
            pass
        libvirt_file(name).unlink(missing_ok=True)


def test_plain_virsh_start_restores_after_the_hooks_check(saved):
    dom, ram, regs, boot = saved("raw")
    assert libvirt_file(dom.name()).samefile(image(dom))
    r = virsh("start", dom.name())
    assert r.returncode == 0, r.stderr
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED  # saved paused, comes back paused
    assert (guest.ram_sha256(dom, MEM), guest.registers(dom)) == (ram, regs)
    assert not libvirt_file(dom.name()).exists()
    assert not image(dom).exists(), "the hook's 'started' phase lets go of fastsave's copy"
    dom.resume()
    assert guest.wait_booted(dom).boot_id == boot
    assert fastsave.has_managed_save_image(dom) == 0


def test_a_format_this_libvirt_cannot_read_is_refused_with_a_pointer(saved):
    dom, ram, _, _ = saved("zstd")
    if published.readable(published.FORMAT_ZSTD, dom.connect().getLibVersion()):
        assert libvirt_file(dom.name()).samefile(image(dom))
        assert virsh("start", dom.name()).returncode == 0  # libvirt >= 10.4 reads zstd
    else:
        assert not libvirt_file(dom.name()).exists()
        r = virsh("start", dom.name())
        assert r.returncode != 0 and f"fastsave start {dom.name()}" in r.stderr
        assert not dom.isActive() and image(dom).exists()
        fastsave.start(dom)
    assert guest.ram_sha256(dom, MEM) == ram


def test_a_corrupt_published_image_never_reaches_qemu(saved):
    dom, _, _, boot = saved("raw")
    path = image(dom)
    with open(path, "r+b") as f:  # the inode libvirt's link shares
        f.seek(path.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    r = virsh("start", dom.name())
    assert r.returncode != 0
    assert "failed its check" in r.stderr and "set aside" in r.stderr, r.stderr
    assert not dom.isActive(), "not started, with stale or any state"
    assert not libvirt_file(dom.name()).exists() and not path.exists()
    orphans = fastsave.image_store(dom.connect()).list_orphans()
    assert any(u == dom.UUIDString() for u, _ in orphans)
    r = virsh("start", dom.name())  # nothing saved any more: boots fresh
    assert r.returncode == 0, r.stderr
    assert guest.wait_booted(dom).boot_id != boot


def test_force_boot_discards_fastsaves_copy_at_once(saved):
    dom, _, _, boot = saved("raw")
    r = virsh("start", "--force-boot", dom.name())
    assert r.returncode == 0, r.stderr
    assert guest.wait_booted(dom).boot_id != boot
    assert not libvirt_file(dom.name()).exists() and not image(dom).exists()


def test_managedsave_remove_then_start_boots_fresh(saved):
    """virDomainManagedSaveRemove removes libvirt's file; virsh's
    managedsave-remove first asks virDomainHasManagedSaveImage, which
    answers from a flag libvirt sets only for its own saves (or when the
    daemon loads), so it skips a published image: a documented gap."""
    dom, _, _, boot = saved("raw")
    r = virsh("managedsave-remove", dom.name())
    assert r.returncode == 0
    if libvirt_file(dom.name()).exists():
        assert "removal skipped" in r.stdout, r.stdout
        dom.managedSaveRemove(0)
    assert not libvirt_file(dom.name()).exists()
    r = virsh("start", dom.name())
    assert r.returncode == 0, r.stderr
    assert guest.wait_booted(dom).boot_id != boot
    assert not image(dom).exists()


def test_a_redefined_domain_never_restores_through_libvirt(saved):
    dom, _, _, boot = saved("raw")
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).replace(restore_xml.BIND_NS, "urn:example:x")
    dom = dom.connect().defineXML(xml)  # a new definition, same name and UUID
    r = virsh("start", dom.name())  # no fastsave call in between
    assert r.returncode != 0 and "current definition" in r.stderr, r.stderr
    assert not dom.isActive() and not libvirt_file(dom.name()).exists()
    r = virsh("start", dom.name())
    assert r.returncode == 0, r.stderr
    assert guest.wait_booted(dom).boot_id != boot


def test_undefine_is_refused_while_published(saved):
    dom, _, _, _ = saved("raw")
    r = virsh("undefine", dom.name())
    assert r.returncode != 0 and "managed save image exists" in r.stderr
    assert dom.isPersistent() and image(dom).exists()


def test_after_a_rename_plain_starts_point_to_fastsave(saved):
    dom, ram, _, _ = saved("raw")
    new = dom.name() + "-renamed"
    dom.rename(new, 0)
    dom = dom.connect().lookupByName(new)
    r = virsh("start", new)
    assert r.returncode != 0 and "renamed" in r.stderr and f"fastsave start {new}" in r.stderr
    assert not dom.isActive() and image(dom).exists()
    fastsave.start(dom)
    assert guest.ram_sha256(dom, MEM) == ram


# libvirt needs its event loop registered before a process opens its first
# connection: the events are watched from a process of their own.
_WATCH = """
import sys, libvirt
libvirt.virEventRegisterDefaultImpl()
conn = libvirt.open(sys.argv[1])
def cb(_c, d, event, detail, _o):
    if d.UUIDString() == sys.argv[2]:
        print(event, detail, flush=True)
conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, cb, None)
print("ready", flush=True)
while True:
    libvirt.virEventRunDefaultImpl()
"""


class Events:
    def __init__(self, uri: str, uuid: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _WATCH, uri, uuid],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.lines: list[tuple[int, int]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            event, detail = line.split()
            self.lines.append((int(event), int(detail)))

    def take(self, n: int) -> list[tuple[int, int]]:
        """The events so far, once there are n (or after 10 s), and forgets them."""
        deadline = time.monotonic() + 10
        while len(self.lines) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # and any that follow at once
        out, self.lines = self.lines, []
        return out

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_what_libvirt_reports_for_fastsaves_save_and_restore(make_system_guest, system_libvirtd):
    """docs/libvirt.md: the events and state reasons, measured."""
    dom = make_system_guest(MEM)
    events = Events(system_libvirtd, dom.UUIDString())
    E = libvirt
    try:
        fastsave.managed_save(dom, mode="raw")
        assert dom.state() == [E.VIR_DOMAIN_SHUTOFF, E.VIR_DOMAIN_SHUTOFF_DESTROYED]
        assert events.take(3) == [
            (E.VIR_DOMAIN_EVENT_SUSPENDED, E.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED),
            (E.VIR_DOMAIN_EVENT_SHUTDOWN, E.VIR_DOMAIN_EVENT_SHUTDOWN_HOST),
            (E.VIR_DOMAIN_EVENT_STOPPED, E.VIR_DOMAIN_EVENT_STOPPED_DESTROYED)]
        dom.create()  # libvirt's path: libvirt's own restore events
        assert dom.state() == [E.VIR_DOMAIN_RUNNING, E.VIR_DOMAIN_RUNNING_RESTORED]
        assert events.take(2) == [
            (E.VIR_DOMAIN_EVENT_STARTED, E.VIR_DOMAIN_EVENT_STARTED_RESTORED),
            (E.VIR_DOMAIN_EVENT_RESUMED, E.VIR_DOMAIN_EVENT_RESUMED_FROM_SNAPSHOT)]
        fastsave.managed_save(dom, mode="raw")
        events.take(3)
        fastsave.start(dom)  # fastsave's path: QEMU started paused, fed the stream, resumed
        assert dom.state() == [E.VIR_DOMAIN_RUNNING, E.VIR_DOMAIN_RUNNING_UNPAUSED]
        assert events.take(3) == [
            (E.VIR_DOMAIN_EVENT_STARTED, E.VIR_DOMAIN_EVENT_STARTED_BOOTED),
            (E.VIR_DOMAIN_EVENT_SUSPENDED, E.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED),
            (E.VIR_DOMAIN_EVENT_RESUMED, E.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED)]
    finally:
        events.close()
        if dom.isActive():
            dom.destroy()
        fastsave.managed_save_remove(dom)
