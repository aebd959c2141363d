"""save-all / restore-all on the embedded driver: several guests at once."""
from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import libvirt
import pytest

import fastsave
from fastsave.bulk import restore_all, save_all
from testkit import guest

pytestmark = pytest.mark.qemu

FILL_MIB = 96


@pytest.fixture(scope="module")
def fill(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("bulkfill") / "fill.bin"
    with open(p, "wb") as f:
        for _ in range(FILL_MIB):
            f.write(os.urandom(1 << 20))
    return str(p)


def test_four_guests_saved_together_and_restored(make_guest, embed_conn, fill):
    mem = 160
    doms = [make_guest(mem, fill=fill) for _ in range(4)]
    before = {}
    for d in doms:
        d.suspend()
        before[d.name()] = (guest.ram_sha256(d, mem), guest.read_state(d))
    names = [d.name() for d in doms]
    report = save_all(embed_conn, names=names, parallel=4)
    assert report.ok, [r.error for r in report.results]
    assert sorted(r.name for r in report.results) == sorted(names)
    assert all(r.action == "saved" and r.image_bytes > 0 for r in report.results)
    assert report.total_bytes > 4 * FILL_MIB << 20
    assert all(not d.isActive() and fastsave.has_managed_save_image(d) for d in doms)

    report = restore_all(embed_conn, names=names, parallel=4)
    assert report.ok, [r.error for r in report.results]
    for d in doms:
        assert d.state()[0] == libvirt.VIR_DOMAIN_PAUSED  # they were saved paused
        ram, st = before[d.name()]
        assert guest.ram_sha256(d, mem) == ram
        d.resume()
        now = guest.read_state(d)
        assert now.boot_id == st.boot_id and now.counter >= st.counter
        assert fastsave.has_managed_save_image(d) == 0


def test_one_guest_killed_during_save_all(make_guest, embed_conn, fill):
    doms = [make_guest(160, fill=fill) for _ in range(4)]
    victim = doms[1]
    store = Path(fastsave.image_store(embed_conn).directory)
    box: list = []
    t = threading.Thread(target=lambda: box.append(
        save_all(embed_conn, names=[d.name() for d in doms], parallel=2,
                 options=fastsave.Options(mode="raw"))))
    t.start()
    deadline = time.monotonic() + 60
    while not any(victim.UUIDString() in p.name and "fastsave-tmp" in p.name for p in store.iterdir()):
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.002)
    pids = subprocess.run(["pgrep", "-f", f"guest={victim.name()}"], capture_output=True,
                          text=True).stdout.split()
    for p in pids:
        os.kill(int(p), 9)
    t.join(120)
    report = box[0]
    by = {r.name: r for r in report.results}
    assert not by[victim.name()].ok and "no longer running" in by[victim.name()].error
    assert [r.ok for r in report.results].count(True) == 3
    assert fastsave.has_managed_save_image(victim) == 0
    for d in doms:
        if d is not victim:
            assert fastsave.has_managed_save_image(d) == 1


def test_deadline_applies_the_action_to_domains_not_started(make_guest, embed_conn):
    doms = [make_guest(64) for _ in range(3)]
    report = save_all(embed_conn, names=[d.name() for d in doms], timeout=1e-9,
                      on_timeout="destroy", parallel=1)
    assert not report.ok
    assert all(r.action == "destroyed" and "deadline" in r.error for r in report.results)
    assert all(not d.isActive() and not fastsave.has_managed_save_image(d) for d in doms)
