"""Fault matrix on the embedded driver. Every case ends with the guest either
still running (or paused, as it was) with its RAM intact, or fully saved in a
valid image; never neither; and the error names the cause."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import libvirt
import pytest

import fastsave
from fastsave import engine, worker
from fastsave.errors import ImageError
from testkit import guest
from testkit.background import save_in_thread, wait_until_writing
from testkit.engine_io import restore_collect

pytestmark = [pytest.mark.qemu, pytest.mark.root]

HERE = Path(__file__).resolve().parent
MEM = 192


@pytest.fixture(scope="module")
def fill(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("faultfill") / "fill.bin"
    p.write_bytes(os.urandom(128 << 20))
    return str(p)


@pytest.fixture(scope="module")
def eio_shim(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shim") / "eio_shim.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(out), str(HERE / "eio_shim.c"), "-ldl"],
                   check=True)
    return str(out)


def paused_guest(make_guest, fill) -> tuple[object, str]:
    dom = make_guest(MEM, fill=fill)
    dom.suspend()
    return dom, guest.ram_sha256(dom, MEM)


def assert_intact_or_saved(dom, ram: str) -> str:
    """The guest is alive with the same RAM, or its image is valid and restores it."""
    store = fastsave.image_store(dom.connect())
    if dom.isActive():
        assert guest.ram_sha256(dom, MEM) == ram
        assert fastsave.has_managed_save_image(dom) == 0
        return "intact"
    engine.verify(store.image_path(dom.UUIDString()))
    fastsave.start(dom)
    assert guest.ram_sha256(dom, MEM) == ram
    return "saved"


def leftovers(dom) -> list[str]:
    d = Path(fastsave.image_store(dom.connect()).directory)  # opening cleans dead temp files
    return sorted(p.name for p in d.iterdir()
                  if not p.name.endswith((".lock", ".fsimg")) and p.name != ".fastsave-store")


@pytest.mark.parametrize("after_mib", [0, 1, 48])
def test_write_errors(make_guest, fill, eio_shim, after_mib, monkeypatch):
    dom, ram = paused_guest(make_guest, fill)
    # The engine child gets a fixed, minimal environment (never the caller's):
    # the shim goes into that one, for this test only.
    monkeypatch.setattr(worker, "CHILD_ENV", dict(
        worker.CHILD_ENV, LD_PRELOAD=eio_shim, FASTSAVE_EIO_AFTER=str(after_mib << 20)))
    with pytest.raises(libvirt.libvirtError, match="Input/output error"):
        fastsave.managed_save(dom)
    monkeypatch.undo()
    assert assert_intact_or_saved(dom, ram) == "intact"
    assert leftovers(dom) == []


def save_until_writing(dom, store: Path) -> tuple[threading.Thread, list]:
    """Starts a managed save into `store` in a thread; returns once the engine
    is writing its temp file (the thread, and a list that gets its outcome)."""
    t, box = save_in_thread(dom, image_dir=str(store), mode="zstd", level=5)
    wait_until_writing(store, t)
    return t, box


def test_image_directory_removed_mid_save(make_guest, fill, tmp_path):
    dom, ram = paused_guest(make_guest, fill)
    store = tmp_path / "store"
    t, box = save_until_writing(dom, store)
    shutil.rmtree(store)
    t.join(120)
    assert box and "No such file or directory" in str(box[0])
    assert assert_intact_or_saved(dom, ram) == "intact"


@pytest.mark.skipif(shutil.which("chattr") is None, reason="chattr (e2fsprogs) is needed")
def test_image_directory_made_unwritable_mid_save(make_guest, fill, tmp_path):
    """Root ignores permission bits, so the store is made immutable (chattr +i)."""
    dom, ram = paused_guest(make_guest, fill)
    store = tmp_path / "store"
    t, box = save_until_writing(dom, store)
    subprocess.run(["chattr", "+i", str(store)], check=True)
    try:
        t.join(120)
    finally:
        subprocess.run(["chattr", "-i", str(store)], check=True)
    assert box and "Operation not permitted" in str(box[0])
    assert assert_intact_or_saved(dom, ram) == "intact"


def test_qemu_killed_mid_restore(make_guest, fill):
    dom, ram = paused_guest(make_guest, fill)
    fastsave.managed_save(dom)
    path = Path(fastsave.image_store(dom.connect()).image_path(dom.UUIDString()))
    box: list = []

    def run() -> None:
        try:
            fastsave.start(dom)
        except libvirt.libvirtError as e:
            box.append(e)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    pids: list[str] = []
    while not pids:  # the restoring QEMU: started with -incoming
        out = subprocess.run(["pgrep", "-f", f"guest={dom.name()}.*-incoming"], capture_output=True,
                             text=True).stdout.split()
        pids = out
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.002)
    time.sleep(0.05)
    for p in pids:
        os.kill(int(p), 9)
    t.join(120)
    if box:  # the kill landed while the stream was going in
        assert "restore of domain" in str(box[0]) and "kept" in str(box[0])
        assert not dom.isActive() and path.exists()
        engine.verify(path)  # the image itself is untouched
        fastsave.start(dom)
    assert guest.ram_sha256(dom, MEM) == ram
    dom.destroy()
    fastsave.start(dom, libvirt.VIR_DOMAIN_START_FORCE_BOOT)
    assert dom.isActive() and not path.exists()


def _corrupt(raw: bytes, info: engine.ImageInfo, rnd: random.Random) -> tuple[bytes, str]:
    b = bytearray(raw)
    kind = rnd.choice(["flip", "truncate", "zero", "swap", "dup", "forge"])
    p0, plen = info.payload_offset, info.payload_length
    if kind == "flip":
        b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
    elif kind == "truncate":
        del b[rnd.randrange(len(b)):]
    elif kind == "zero":
        at = rnd.randrange(len(b))
        b[at:at + rnd.randrange(1, 8192)] = bytes(len(b[at:at + 8192][:rnd.randrange(1, 8192)]))
    elif kind in ("swap", "dup"):
        n = rnd.randrange(512, 65536)
        a, c = rnd.randrange(p0, p0 + plen - n), rnd.randrange(p0, p0 + plen - n)
        seg_a, seg_c = bytes(b[a:a + n]), bytes(b[c:c + n])
        if seg_a == seg_c:
            b[a] ^= 0xFF
        b[c:c + n] = seg_a
        if kind == "swap":
            b[a:a + n] = seg_c
    else:  # forge a length field in the index or the trailer
        at = rnd.choice([len(b) - 128 + 8 + rnd.randrange(0, 48), len(b) - 400 + rnd.randrange(0, 272)])
        b[at:at + 4] = rnd.getrandbits(32).to_bytes(4, "little")
    return bytes(b), kind


def test_random_corruptions_never_pass(make_guest, fill, tmp_path):
    """200 random corruptions of a real guest's image: every one is refused by
    the engine, and a sample goes through fastsave.start with QEMU."""
    dom, ram = paused_guest(make_guest, fill)
    fastsave.managed_save(dom, mode="zstd")
    path = Path(fastsave.image_store(dom.connect()).image_path(dom.UUIDString()))
    good = path.read_bytes()
    info = engine.inspect(path)
    stream = restore_collect(path)[0]
    rnd = random.Random(2024)
    bad = tmp_path / "bad.img"
    kinds: dict[str, int] = {}
    for i in range(200):
        data, kind = _corrupt(good, info, rnd)
        if data == good:
            continue
        bad.write_bytes(data)
        out, err = restore_collect(bad)
        assert isinstance(err, ImageError), f"case {i} ({kind}) passed: {err!r}"
        assert stream.startswith(out)
        kinds[kind] = kinds.get(kind, 0) + 1
        if i % 25 == 0:  # through QEMU: the start fails, the image stays, nothing runs
            path.write_bytes(data)
            with pytest.raises(libvirt.libvirtError):
                fastsave.start(dom)
            assert not dom.isActive() and path.exists()
    assert sum(kinds.values()) >= 190
    path.write_bytes(good)
    fastsave.start(dom)
    assert guest.ram_sha256(dom, MEM) == ram
