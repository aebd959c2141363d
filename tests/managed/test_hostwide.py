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
from fastsave.hostwide import restore_all, save_all
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

    import fastsave.hostwide as hostwide
    direct = []

    def start(d, flags=0, options=None):
        direct.append(options.direct)
        return real_start(d, flags, options=options)
    real_start, hostwide.start = hostwide.start, start
    try:
        report = restore_all(embed_conn, names=names, parallel=4)
    finally:
        hostwide.start = real_start
    assert report.ok, [r.error for r in report.results]
    assert direct == [True] * 4  # several at once: O_DIRECT reads, no second copy in the cache
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


# -- host shutdown and boot, as libvirt-guests: the record of running guests

def _store_opts(tmp_path) -> fastsave.Options:
    """A store of the test's own: the record lives in the store, and the
    session's other guests must not be in it."""
    return fastsave.Options(image_dir=str(tmp_path / "store"))


def _record(opts: fastsave.Options) -> Path:
    from fastsave.hostwide import RECORD_NAME
    return Path(opts.image_dir) / RECORD_NAME


def test_boot_starts_exactly_the_guests_running_at_shutdown(make_guest, embed_conn, tmp_path):
    opts = _store_opts(tmp_path)
    restored, booted = make_guest(64), make_guest(64)
    never_ran = make_guest(64, start=False)
    saved_by_hand = make_guest(64)
    fastsave.managed_save(saved_by_hand, options=opts)  # shut off before the host went down
    before = guest.read_state(restored)
    names = [d.name() for d in (restored, booted, never_ran, saved_by_hand)]

    report = save_all(embed_conn, names=names, record=True, options=opts)
    assert report.ok and sorted(r.name for r in report.results) == sorted([restored.name(), booted.name()])
    rec = _record(opts)
    assert rec.stat().st_mode & 0o777 == 0o600
    from fastsave.hostwide import read_record
    with fastsave.image_store(embed_conn, opts.image_dir) as store:
        assert read_record(store) == ([d.UUIDString() for d in sorted(
            (restored, booted), key=lambda d: d.name())], None)
    # `booted` lost its state (say its save failed and it was killed): at
    # boot it is started anyway, by a normal boot, as libvirt-guests does.
    fastsave.managed_save_remove(booted, options=opts)

    report = restore_all(embed_conn, boot=True, options=opts)
    assert report.ok, [r.error for r in report.results]
    assert {r.name: r.action for r in report.results} == {restored.name(): "restored",
                                                          booted.name(): "started"}
    now = guest.read_state(restored)
    assert now.boot_id == before.boot_id and now.counter >= before.counter
    assert booted.isActive() and guest.wait_booted(booted)
    assert not never_ran.isActive()
    assert not saved_by_hand.isActive() and fastsave.has_managed_save_image(saved_by_hand, options=opts)
    assert not rec.exists()  # processed once: the next boot starts nothing
    assert restore_all(embed_conn, boot=True, options=opts).results == []


def test_a_second_save_all_keeps_the_first_record(make_guest, embed_conn, tmp_path):
    opts = _store_opts(tmp_path)
    a, b = make_guest(64), make_guest(64)
    assert save_all(embed_conn, names=[a.name()], record=True, options=opts).ok
    assert save_all(embed_conn, names=[b.name()], record=True, options=opts).ok
    report = restore_all(embed_conn, boot=True, options=opts)
    assert sorted(r.name for r in report.results if r.action == "restored") == sorted([a.name(), b.name()])


def _qemu_start_ticks(dom) -> int:
    """When the domain's QEMU process started, in clock ticks since boot."""
    pids = subprocess.run(["pgrep", "-f", f"guest={dom.name()}"], capture_output=True,
                          text=True).stdout.split()
    assert len(pids) == 1, pids
    stat = Path(f"/proc/{pids[0]}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[19])


def test_start_delay_separates_the_starts(make_guest, embed_conn, tmp_path):
    opts = _store_opts(tmp_path)
    doms = [make_guest(64) for _ in range(3)]
    assert save_all(embed_conn, names=[d.name() for d in doms], record=True, options=opts).ok
    delay = 2.0
    report = restore_all(embed_conn, boot=True, start_delay=delay, parallel=3, options=opts)
    assert report.ok and len(report.results) == 3, [r.error for r in report.results]
    hz = os.sysconf("SC_CLK_TCK")
    starts = sorted(_qemu_start_ticks(d) / hz for d in doms)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    # Each start begins `delay` after the previous one began; QEMU's exec
    # follows within a fraction of a second (generous bounds: shared machine).
    assert all(delay - 0.5 <= g <= delay + 20 for g in gaps), gaps


def test_on_boot_ignore_starts_nothing_and_keeps_the_images(make_guest, embed_conn, tmp_path):
    opts = _store_opts(tmp_path)
    d = make_guest(64)
    assert save_all(embed_conn, names=[d.name()], record=True, options=opts).ok
    report = restore_all(embed_conn, boot=True, on_boot="ignore", options=opts)
    assert report.ok and report.results == [] and "ON_BOOT=ignore" in report.warnings[0]
    assert not d.isActive() and fastsave.has_managed_save_image(d, options=opts)
    assert not _record(opts).exists()


def test_on_shutdown_shutdown_saves_or_destroys_a_guest_ignoring_acpi(make_guest, embed_conn, tmp_path):
    """The test kernel has no ACPI support: a power-off request does nothing."""
    opts = _store_opts(tmp_path)
    kept, killed = make_guest(64), make_guest(64)
    t = time.monotonic()
    report = save_all(embed_conn, names=[kept.name()], on_shutdown="shutdown", timeout=3,
                      options=opts)
    assert time.monotonic() - t >= 3  # it waited for the power-off
    (r,) = report.results
    assert r.ok and r.action == "saved (did not power off)", r
    assert not kept.isActive() and fastsave.has_managed_save_image(kept, options=opts)

    report = save_all(embed_conn, names=[killed.name()], on_shutdown="shutdown", timeout=2,
                      on_timeout="destroy", options=opts)
    (r,) = report.results
    assert not r.ok and r.action == "destroyed" and "did not power off within 2 s" in r.error
    assert not killed.isActive() and not fastsave.has_managed_save_image(killed, options=opts)


def test_on_timeout_checked_against_on_shutdown(embed_conn):
    with pytest.raises(ValueError, match="on_timeout"):
        save_all(embed_conn, names=["none"], on_shutdown="shutdown", on_timeout="shutdown")
    with pytest.raises(ValueError, match="on_timeout"):
        save_all(embed_conn, names=["none"], on_timeout="save")
