"""The controlling process killed, or libvirtd restarted, at the exact points
where a save or restore is most fragile, under the system libvirtd (a second
process needs the daemon). After each fault the next fastsave call settles
it, and the invariant holds: never a running domain beside its image; the
saved state is never lost and never brought back stale."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import libvirt
import pytest

import fastsave
from testkit import guest

pytestmark = [pytest.mark.qemu, pytest.mark.root]

MEM = 64


def image(dom) -> Path:
    return Path(fastsave.image_store(dom.connect()).image_path(dom.UUIDString()))


def assert_invariant(dom) -> None:
    assert not (dom.isActive() and image(dom).exists()), "a running domain beside its image"


def _die_at(uri: str, dom, op: str, patch: str) -> None:
    """Runs `op` (save/start) on the domain in a child process that patches
    one step to SIGKILL itself right after the step (the exact point)."""
    head = "import os, signal, libvirt, fastsave\nfrom fastsave import store, restoring\n"
    body = textwrap.dedent(f"""
        conn = libvirt.open({uri!r})
        dom = conn.lookupByUUIDString({dom.UUIDString()!r})
        if {op!r} == "save":
            fastsave.managed_save(dom, mode="raw")
        else:
            fastsave.start(dom)
        raise SystemExit("the fault point was never reached")
    """)
    code = head + textwrap.dedent(patch) + body
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


KILL_AFTER_COMMIT = """
real = store.ImageStore.commit_pending
def commit_then_die(self, uuid):
    real(self, uuid)
    os.kill(os.getpid(), signal.SIGKILL)
store.ImageStore.commit_pending = commit_then_die
"""

KILL_AFTER_CREATE = """
real = libvirt.virConnect.createXML
def create_then_die(self, xml, flags=0):
    dom = real(self, xml, flags)
    os.kill(os.getpid(), signal.SIGKILL)
libvirt.virConnect.createXML = create_then_die
"""

KILL_AFTER_INCOMING = """
real = restoring.complete
def die_before_complete(*a, **kw):
    os.kill(os.getpid(), signal.SIGKILL)
restoring.complete = die_before_complete
"""


@pytest.mark.parametrize("was", ["running", "paused"])
def test_killed_after_commit_before_stop_finishes_the_save(make_system_guest, system_libvirtd, was):
    dom = make_system_guest(MEM)
    boot = guest.read_state(dom).boot_id
    if was == "paused":
        dom.suspend()
        ram = guest.ram_sha256(dom, MEM)
    _die_at(system_libvirtd, dom, "save", KILL_AFTER_COMMIT)
    # Left: a committed image beside a paused QEMU. The old code resumed it.
    assert image(dom).exists() and dom.isActive()
    assert fastsave.has_managed_save_image(dom) == 1
    assert not dom.isActive(), "recovery must finish the save, not resume the guest"
    assert_invariant(dom)
    fastsave.start(dom)
    assert_invariant(dom)
    if was == "paused":
        assert guest.ram_sha256(dom, MEM) == ram
    assert guest.read_state(dom).boot_id == boot


@pytest.mark.parametrize("point", ["after-createXML", "after-incoming"])
def test_killed_mid_restore_keeps_or_finishes_the_state(make_system_guest, system_libvirtd, point):
    dom = make_system_guest(MEM)
    dom.suspend()
    ram = guest.ram_sha256(dom, MEM)
    fastsave.managed_save(dom, mode="raw")
    _die_at(system_libvirtd, dom, "start",
            KILL_AFTER_CREATE if point == "after-createXML" else KILL_AFTER_INCOMING)
    assert dom.isActive() and image(dom).exists()
    if point == "after-createXML":
        # QEMU waits for a stream that will never come: it holds no state.
        # The image is the only copy and must survive (the old code deleted it).
        assert fastsave.has_managed_save_image(dom) == 1
        assert not dom.isActive() and image(dom).exists()
        fastsave.start(dom)
    else:
        # The stream was complete: the state lives in QEMU, the image is stale.
        assert fastsave.has_managed_save_image(dom) == 0
        assert dom.isActive() and not image(dom).exists()
    assert_invariant(dom)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    assert guest.ram_sha256(dom, MEM) == ram


def test_libvirtd_restart_after_commit_still_stops_the_domain(make_system_guest, system_libvirtd,
                                                              monkeypatch):
    from fastsave.store import ImageStore
    from testkit.system_daemon import restart_libvirtd

    dom = make_system_guest(MEM)
    uuid = dom.UUIDString()
    boot = guest.read_state(dom).boot_id
    real = ImageStore.commit_pending

    def commit_then_restart(self, u):
        real(self, u)
        restart_libvirtd()

    monkeypatch.setattr(ImageStore, "commit_pending", commit_then_restart)
    assert fastsave.managed_save(dom, mode="raw") == 0
    monkeypatch.undo()
    conn = libvirt.open(system_libvirtd)
    dom = conn.lookupByUUIDString(uuid)
    assert not dom.isActive() and image(dom).exists()
    fastsave.start(dom)
    assert guest.read_state(dom).boot_id == boot
    conn.close()


def test_libvirtd_restart_after_createXML_destroys_and_keeps_the_image(
        make_system_guest, system_libvirtd, monkeypatch):
    from testkit.system_daemon import restart_libvirtd

    dom = make_system_guest(MEM)
    uuid = dom.UUIDString()
    dom.suspend()
    ram = guest.ram_sha256(dom, MEM)
    fastsave.managed_save(dom, mode="raw")
    real = libvirt.virConnect.createXML

    def create_then_restart(self, xml, flags=0):
        live = real(self, xml, flags)
        restart_libvirtd()
        return live

    monkeypatch.setattr(libvirt.virConnect, "createXML", create_then_restart)
    with pytest.raises(libvirt.libvirtError, match="is kept"):
        fastsave.start(dom)
    monkeypatch.undo()
    conn = libvirt.open(system_libvirtd)
    dom = conn.lookupByUUIDString(uuid)
    assert not dom.isActive(), "the half-started QEMU must be stopped"
    assert fastsave.has_managed_save_image(dom) == 1 and image(dom).exists()
    fastsave.start(dom)
    assert guest.ram_sha256(dom, MEM) == ram
    conn.close()


# -- item 12: SIGTERM / SIGHUP roll the save back ---------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_signal_mid_save_rolls_back(make_system_guest, system_libvirtd, tmp_path, sig):
    fill = tmp_path / "fill.bin"
    fill.write_bytes(os.urandom(96 << 20))
    dom = make_system_guest(128, fill=str(fill))
    boot = guest.read_state(dom).boot_id
    store = Path(fastsave.image_store(dom.connect()).directory)
    proc = subprocess.Popen([sys.executable, "-m", "fastsave", "--uri", system_libvirtd, "save",
                             "--mode", "zstd", "--level", "9", dom.name()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any("fastsave-tmp" in p.name for p in store.iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the save must not report success"
    assert "no image was kept" in err and "running again" in err, err
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert guest.read_state(dom).boot_id == boot
    assert not image(dom).exists()
    assert not (store / f".{dom.UUIDString()}.saving").exists(), "the mark outlived a settled roll-back"
    assert fastsave.has_managed_save_image(dom) == 0

