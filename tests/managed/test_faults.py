"""Failures injected mid-save: the guest must end either still running with its
memory intact, or fully saved; never neither, and no half image."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import libvirt
import pytest

import fastsave
from testkit import guest
from testkit.background import save_in_thread

pytestmark = [pytest.mark.qemu, pytest.mark.root]

FILL_MIB = 192


@pytest.fixture(scope="module")
def fill_file(tmp_path_factory) -> str:
    """Random memory content, loaded into the guest from the host side: the
    stream is big and incompressible, so a save takes long enough to hit."""
    p = tmp_path_factory.mktemp("fill") / "fill.bin"
    with open(p, "wb") as f:
        for _ in range(FILL_MIB):
            f.write(os.urandom(1 << 20))
    return str(p)


def store_files(dom) -> list[str]:
    d = Path(fastsave.image_store(dom.connect()).directory)
    return sorted(p.name for p in d.iterdir()
                  if not p.name.endswith(".lock") and p.name != ".fastsave-store")


def workers() -> list[int]:
    """This test process's own engine children (never another run's)."""
    out = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "fastsave.worker"],
                         capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.parametrize("paused", [True, False], ids=["paused", "running"])
def test_engine_process_killed_mid_save(make_guest, fill_file, paused):
    mem = 256
    dom = make_guest(mem, fill=fill_file)
    if paused:
        dom.suspend()
        ram = guest.ram_sha256(dom, mem)
    boot = guest.read_state(dom).boot_id
    store = Path(fastsave.image_store(dom.connect()).directory)
    t, result = save_in_thread(dom, mode="raw", direct=False)
    deadline = time.monotonic() + 60
    while True:  # wait until the engine has written real data, then kill it
        tmps = [p for p in store.iterdir() if ".fastsave-tmp-" in p.name]
        if tmps and tmps[0].stat().st_size > (16 << 20) and workers():
            break
        assert time.monotonic() < deadline and t.is_alive(), "the save ended before it could be hit"
        time.sleep(0.005)
    for pid in workers():
        os.kill(pid, 9)
    t.join(60)
    err = result[0]
    assert isinstance(err, libvirt.libvirtError), "the save must fail"
    assert err.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED
    assert "engine process" in str(err) and "killed" in str(err)
    assert dom.isActive()
    if paused:
        assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        assert guest.ram_sha256(dom, mem) == ram
        dom.resume()
    else:
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert guest.read_state(dom).boot_id == boot
    assert fastsave.has_managed_save_image(dom) == 0
    fastsave.image_store(dom.connect())  # opening the store cleans up what the dead engine left
    assert store_files(dom) == []


@pytest.mark.parametrize("size_mib", [1, 64, 176])  # full in the header, midway, near the end
def test_store_on_a_full_filesystem(make_guest, fill_file, tmp_path, size_mib):
    full = tmp_path / "full"
    full.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(full)],
                   check=True)
    try:
        mem = 256
        dom = make_guest(mem, fill=fill_file)
        dom.suspend()
        ram = guest.ram_sha256(dom, mem)
        with pytest.raises(libvirt.libvirtError) as ei:
            fastsave.managed_save(dom, image_dir=str(full), mode="raw")
        assert "No space left on device" in str(ei.value)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED  # as it was
        assert guest.ram_sha256(dom, mem) == ram
        assert [p for p in os.listdir(full) if not p.endswith(".lock")] == []
        dom.resume()
        with pytest.raises(libvirt.libvirtError, match="No space"):
            fastsave.managed_save(dom, image_dir=str(full), mode="auto")
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert fastsave.has_managed_save_image(dom, image_dir=str(full)) == 0
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)


def test_qemu_killed_mid_save(make_guest, fill_file):
    dom = make_guest(256, fill=fill_file)
    store = Path(fastsave.image_store(dom.connect()).directory)
    t, result = save_in_thread(dom, mode="raw")
    deadline = time.monotonic() + 60
    while not [p for p in store.iterdir() if ".fastsave-tmp-" in p.name and p.stat().st_size > (8 << 20)]:
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.005)
    qemu = subprocess.run(["pgrep", "-f", f"guest={dom.name()}"], capture_output=True, text=True).stdout.split()
    for p in qemu:
        os.kill(int(p), 9)
    t.join(60)
    err = result[0]
    assert isinstance(err, libvirt.libvirtError)
    assert "no longer running" in str(err)
    assert fastsave.has_managed_save_image(dom) == 0  # a cut stream never passes for a saved state
    fastsave.image_store(dom.connect())
    assert store_files(dom) == []


def test_concurrent_calls_on_one_domain(make_guest, fill_file):
    """While one save runs, a second save, a start and a remove of the same domain are refused."""
    dom = make_guest(256, fill=fill_file)
    store = Path(fastsave.image_store(dom.connect()).directory)
    t, result = save_in_thread(dom, mode="zstd", level=9)  # slow enough to overlap with
    deadline = time.monotonic() + 60
    while not [p for p in store.iterdir() if ".fastsave-tmp-" in p.name]:
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.002)
    for call in (fastsave.managed_save, fastsave.start, fastsave.managed_save_remove):
        with pytest.raises(libvirt.libvirtError) as ei:
            call(dom)
        assert ei.value.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
        assert "in progress" in str(ei.value)
    t.join(120)
    assert result == [None]  # the first save was not disturbed
    assert fastsave.has_managed_save_image(dom) == 1
    fastsave.start(dom)
    assert dom.isActive()
