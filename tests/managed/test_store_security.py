"""The image store trusts nothing it did not write itself."""
from __future__ import annotations

import os
import shutil
import uuid as _uuid
from pathlib import Path

import libvirt
import pytest

import fastsave
from fastsave.store import ImageStore
from testkit import guest

pytestmark = pytest.mark.qemu


def image_path(dom) -> Path:
    return Path(fastsave.image_store(dom.connect()).image_path(dom.UUIDString()))


def test_symlinked_image_is_refused(make_guest, tmp_path):
    dom = make_guest(64)
    fastsave.managed_save(dom)
    p = image_path(dom)
    elsewhere = tmp_path / "elsewhere.img"
    shutil.move(p, elsewhere)
    p.symlink_to(elsewhere)
    with pytest.raises(libvirt.libvirtError, match="symbolic link"):
        fastsave.start(dom)
    assert not dom.isActive()
    with pytest.raises(libvirt.libvirtError, match="symbolic link"):
        fastsave.has_managed_save_image(dom)


@pytest.mark.root
def test_image_of_another_user_or_writable_by_others_is_refused(make_guest):
    dom = make_guest(64)
    fastsave.managed_save(dom)
    p = image_path(dom)
    os.chown(p, 65534, 65534)
    with pytest.raises(libvirt.libvirtError, match="owned"):
        fastsave.start(dom)
    os.chown(p, 0, 0)
    os.chmod(p, 0o666)
    with pytest.raises(libvirt.libvirtError, match="writable only"):
        fastsave.start(dom)
    os.chmod(p, 0o600)
    fastsave.start(dom)
    assert dom.isActive()


@pytest.mark.parametrize("name", ["..", "...evil..", "a b $(touch x) ; `id`", "x\ty", "тест-ü"])
def test_domain_names_never_steer_a_path(embed_conn, kernel, name):
    try:
        dom = embed_conn.defineXML(guest.domain_xml(name, kernel, 64))
    except libvirt.libvirtError as e:
        pytest.skip(f"libvirt itself refuses the name {name!r}: {e}")
    try:
        dom.create()
        guest.wait_booted(dom)
        fastsave.managed_save(dom)
        store = Path(fastsave.image_store(embed_conn).directory)
        files = [p.name for p in store.iterdir() if not p.name.startswith(".")]
        assert f"{dom.UUIDString()}.fsimg" in files
        assert all(_uuid.UUID(f.split(".")[0]) for f in files)  # only UUID names
        fastsave.start(dom)
        assert dom.isActive()
    finally:
        if dom.isActive():
            dom.destroy()
        fastsave.managed_save_remove(dom)
        dom.undefine()


def test_lock_files_do_not_outlive_the_domains_state(tmp_path):
    store = ImageStore(tmp_path / "images")
    u = str(_uuid.uuid4())
    lock = Path(store.directory) / f".{u}.lock"
    with store.lock(u):
        assert lock.exists()
        with pytest.raises(fastsave.store.DomainBusy):
            with store.lock(u):
                pass
    assert not lock.exists()  # nothing saved: nothing left behind
    Path(store.image_path(u)).write_bytes(b"x")
    with store.lock(u):
        pass
    assert lock.exists()  # a saved state keeps its lock file
    os.unlink(store.image_path(u))
    with store.lock(u):
        pass
    assert not lock.exists()


def test_lock_taken_on_a_file_removed_meanwhile_is_retaken(tmp_path, monkeypatch):
    """A lock won on a lock file that its previous holder removed between our
    open and our flock would exclude nobody: the store must lock the file that
    is at the path now."""
    store = ImageStore(tmp_path / "images")
    u = str(_uuid.uuid4())
    lock = Path(store.directory) / f".{u}.lock"
    real_flock = fastsave.store.fcntl.flock
    calls = []

    def flock(fd, op):
        calls.append(fd)
        if len(calls) == 1:
            os.unlink(lock)  # the previous holder releases and removes it right now
        return real_flock(fd, op)

    monkeypatch.setattr(fastsave.store.fcntl, "flock", flock)
    with store.lock(u):
        assert len(calls) == 2  # it noticed, and locked the file at the path again
        assert lock.exists()
        monkeypatch.setattr(fastsave.store.fcntl, "flock", real_flock)
        with pytest.raises(fastsave.store.DomainBusy):
            with store.lock(u):
                pass
