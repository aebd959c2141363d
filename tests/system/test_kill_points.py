"""The saving process killed with SIGKILL at random points, under the system
libvirtd: afterwards the guest is alive with its RAM intact (resumed by the
next fastsave call when it had been running), or fully saved."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import libvirt
import pytest

import fastsave
from fastsave import engine
from testkit import guest

pytestmark = [pytest.mark.qemu, pytest.mark.root]

POINTS = int(os.environ.get("FASTSAVE_KILL_POINTS", "20"))
MEM = 128


def test_saving_process_killed_at_random_points(make_system_guest, system_libvirtd, tmp_path):
    fill = tmp_path / "fill.bin"
    fill.write_bytes(os.urandom(96 << 20))
    dom = make_system_guest(MEM, fill=str(fill))
    store = fastsave.image_store(dom.connect())
    rnd = random.Random(20)
    outcomes = {"intact": 0, "saved": 0}
    for i in range(POINTS):
        paused = i % 2 == 0
        if paused:
            dom.suspend()
            ram = guest.ram_sha256(dom, MEM)
        boot = guest.read_state(dom).boot_id
        proc = subprocess.Popen([sys.executable, "-m", "fastsave", "--uri", system_libvirtd, "save",
                                 dom.name()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rnd.uniform(0.0, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        fastsave.has_managed_save_image(dom)  # the next call cleans up after the dead one
        image_there = os.path.exists(store.image_path(dom.UUIDString()))
        assert not (dom.isActive() and image_there), f"point {i}: running beside its image"
        if dom.isActive():
            outcomes["intact"] += 1
            want = libvirt.VIR_DOMAIN_PAUSED if paused else libvirt.VIR_DOMAIN_RUNNING
            assert dom.state()[0] == want, f"point {i}: left in state {dom.state()}"
            assert fastsave.has_managed_save_image(dom) == 0
        else:
            outcomes["saved"] += 1
            engine.verify(store.image_path(dom.UUIDString()))
            fastsave.start(dom)
        if paused:
            assert guest.ram_sha256(dom, MEM) == ram, f"point {i}: RAM changed"
            dom.resume()
        assert guest.read_state(dom).boot_id == boot, f"point {i}: the guest rebooted"
    print(f"kill points: {outcomes}")
    assert outcomes["intact"] + outcomes["saved"] == POINTS


def test_libvirtd_restarted_mid_save(make_system_guest, system_libvirtd, tmp_path):
    from pathlib import Path

    from testkit.background import save_in_thread, wait_until_writing
    from testkit.system_daemon import restart_libvirtd

    fill = tmp_path / "fill.bin"
    fill.write_bytes(os.urandom(96 << 20))
    dom = make_system_guest(MEM, fill=str(fill))
    uuid = dom.UUIDString()
    boot = guest.read_state(dom).boot_id
    store = Path(fastsave.image_store(dom.connect()).directory)
    t, box = save_in_thread(dom, mode="zstd", level=7)
    wait_until_writing(store, t)
    restart_libvirtd()
    t.join(180)
    conn = libvirt.open(system_libvirtd)
    dom = conn.lookupByUUIDString(uuid)
    print("libvirtd restart outcome:", box[0])
    if box[0] is None:  # the save got through before the daemon went away
        assert not dom.isActive()
        engine.verify(store / f"{uuid}.fsimg")
        fastsave.start(dom)
    else:
        assert "managed save of domain" in str(box[0])
        fastsave.has_managed_save_image(dom)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, "the guest was left paused"
        assert fastsave.has_managed_save_image(dom) == 0
    assert guest.read_state(dom).boot_id == boot
    conn.close()
