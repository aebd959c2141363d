"""The image store directory: an existing directory is checked and never
changed, every directory above it must be safe from other users, and once
opened the store acts on that directory only, whatever happens to its path."""
from __future__ import annotations

import os
import stat
import uuid as _uuid
from pathlib import Path

import pytest

from fastsave.config import STORE_MARKER
from fastsave.store import DomainBusy, ImageStore, StoreError

NOBODY = 65534
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another user")


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def uid() -> str:
    return str(_uuid.uuid4())


def test_new_store_is_created_private_and_marked(tmp_path):
    with ImageStore(tmp_path / "a" / "b" / "images") as store:
        d = Path(store.directory)
        assert mode(d) == 0o700 and store.marked
        assert (d / STORE_MARKER).is_file()
        assert mode(tmp_path / "a") == 0o755 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_sticky_world_writable_directory_is_refused_unchanged(tmp_path):
    """`--image-dir /tmp` must not strip /tmp of its sticky bit and lock
    everybody out of it."""
    d = tmp_path / "tmp-like"
    d.mkdir()
    os.chmod(d, 0o1777)
    with pytest.raises(StoreError, match="mode 1777.*chmod 700"):
        ImageStore(d)
    assert mode(d) == 0o1777
    assert list(d.iterdir()) == []  # nothing written into it either


@pytest.mark.parametrize("m", [0o755, 0o750, 0o711, 0o701])
def test_directory_others_may_read_or_enter_is_refused_unchanged(tmp_path, m):
    """`--image-dir /var/lib/libvirt/images` must not cut QEMU off its disks."""
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, m)
    (d / "disk.qcow2").write_bytes(b"disk")
    with pytest.raises(StoreError, match=f"has mode {m:o}"):
        ImageStore(d)
    assert mode(d) == m
    assert sorted(p.name for p in d.iterdir()) == ["disk.qcow2"]


def test_existing_private_directory_is_used_as_is(tmp_path):
    d = tmp_path / "old-store"
    d.mkdir(mode=0o700)
    with ImageStore(d) as store:
        assert store.directory == str(d)
        assert not store.marked  # only a created store, or install-hook, marks one
        store.mark()
        assert store.marked
    assert mode(d) == 0o700


@root_only
def test_directory_of_another_user_is_refused(tmp_path):
    d = tmp_path / "other"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(StoreError, match=f"owned by uid {NOBODY}"):
        ImageStore(d)


@root_only
def test_parent_owned_by_another_user_is_refused(tmp_path):
    parent = tmp_path / "theirs"
    parent.mkdir(mode=0o755)
    os.chown(parent, NOBODY, NOBODY)
    (parent / "images").mkdir(mode=0o700)  # ours, but they may rename it and put theirs there
    with pytest.raises(StoreError, match=f"{parent}, above the image store, is owned by uid {NOBODY}"):
        ImageStore(parent / "images")
    with pytest.raises(StoreError, match="above the image store"):
        ImageStore(parent / "new" / "images")
    assert not (parent / "new").exists()  # refused before anything was created under it


@pytest.mark.parametrize("m", [0o777, 0o775, 0o757])
def test_parent_writable_by_others_is_refused(tmp_path, m):
    parent = tmp_path / "open"
    parent.mkdir()
    os.chmod(parent, m)
    (parent / "images").mkdir(mode=0o700)
    with pytest.raises(StoreError, match="writable by group or others"):
        ImageStore(parent / "images")
    assert mode(parent) == m


def test_sticky_parent_is_accepted(tmp_path):
    """Like /tmp: others may not rename or remove what is ours in it."""
    parent = tmp_path / "sticky"
    parent.mkdir()
    os.chmod(parent, 0o1777)
    with ImageStore(parent / "images") as store:
        assert store.marked
    assert mode(parent) == 0o1777


def test_symlinked_store_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(StoreError, match="symlink"):
        ImageStore(link)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(StoreError, match="symlink"):
        ImageStore(dangling)
    assert not (tmp_path / "nowhere").exists()


def test_symlink_above_the_store_is_resolved_once(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "via").symlink_to(tmp_path / "real")
    with ImageStore(tmp_path / "via" / "images") as store:
        assert store.directory == str(tmp_path / "real" / "images")
        assert store.pending_path(uid()).startswith(str(tmp_path / "real" / "images") + "/")


def test_operations_act_on_the_opened_directory(tmp_path):
    """Once opened, the store is that directory: renaming the path away and
    putting another directory there redirects nothing, and the one path
    handed out for writing (the engine's pending file) is refused."""
    path = tmp_path / "images"
    store = ImageStore(path)
    u = uid()
    Path(store.image_path(u)).write_bytes(b"saved")
    moved = tmp_path / "moved"
    os.rename(path, moved)
    path.mkdir(mode=0o700)
    (path / f"{u}.fsimg").write_bytes(b"decoy")

    assert [x[0] for x in store.list_images()] == [u]
    fd = store.open_image(u)
    assert os.read(fd, 10) == b"saved"
    os.close(fd)
    store.mark_saving(u, {"op": "save"})
    token = store.issue_token(u)
    assert (moved / f".{u}.saving").exists() and (moved / f".{u}.token").read_text() == token
    with store.lock(u):
        assert (moved / f".{u}.lock").exists() and not (path / f".{u}.lock").exists()
        with pytest.raises(DomainBusy):
            with store.lock(u):
                pass
    assert store.peek_saving_mark(u) == {"op": "save"}
    store.clear_saving_mark(u)
    store.revoke_token(u)
    with pytest.raises(StoreError, match="moved or replaced"):
        store.pending_path(u)
    with pytest.raises(StoreError, match="moved or replaced"):
        store.scratch_path(u)
    (moved / f".{u}.pending").write_bytes(b"new")
    store.commit_pending(u)
    assert (moved / f"{u}.fsimg").read_bytes() == b"new"
    assert store.remove_image(u) and not (moved / f"{u}.fsimg").exists()
    assert (path / f"{u}.fsimg").read_bytes() == b"decoy"  # never touched
    assert sorted(p.name for p in path.iterdir()) == [f"{u}.fsimg"]
    store.close()


def test_commit_refuses_a_pending_symlink(tmp_path):
    with ImageStore(tmp_path / "images") as store:
        u = uid()
        target = tmp_path / "elsewhere"
        target.write_bytes(b"x")
        os.symlink(target, store.pending_path(u))
        with pytest.raises(StoreError, match="not a regular file"):
            store.commit_pending(u)
        assert not os.path.lexists(store.image_path(u))


def test_quarantine_moves_the_image_out_of_every_start_path(tmp_path):
    with ImageStore(tmp_path / "images") as store:
        u = uid()
        assert store.quarantine_image(u) is None
        Path(store.image_path(u)).write_bytes(b"one")
        first = store.quarantine_image(u)
        Path(store.image_path(u)).write_bytes(b"two")
        second = store.quarantine_image(u)  # the same second: a name of its own
        assert first and second and first != second
        assert Path(first).read_bytes() == b"one" and Path(second).read_bytes() == b"two"
        for p in (first, second):
            name = os.path.basename(p)
            assert name.startswith(f".{u}.orphaned-") and name.endswith(".fsimg")
        assert not store.has_image(u) and store.list_images() == []
        assert sorted(store.list_orphans()) == sorted([(u, first), (u, second)])
        with store.lock(u):
            pass
        assert not os.path.exists(os.path.join(store.directory, f".{u}.lock"))


def test_saving_mark_peek_clear_take(tmp_path):
    with ImageStore(tmp_path / "images") as store:
        u = uid()
        assert store.peek_saving_mark(u) is None and store.take_saving_mark(u) is None
        store.mark_saving(u, {"op": "restore", "resume": True})
        assert store.peek_saving_mark(u) == {"op": "restore", "resume": True}
        assert store.peek_saving_mark(u) == {"op": "restore", "resume": True}  # still there
        store.clear_saving_mark(u)
        store.clear_saving_mark(u)
        assert store.peek_saving_mark(u) is None
        store.mark_saving(u, {"x": 1})
        assert store.take_saving_mark(u) == {"x": 1} and store.peek_saving_mark(u) is None
        Path(store.directory, f".{u}.saving").write_text("not json")
        assert store.peek_saving_mark(u) == {}


def test_store_holds_one_fd_until_closed(tmp_path):
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))
    before = fds()
    with ImageStore(tmp_path / "images") as store:
        assert fds() == before + 1
        store.list_images()
        store.has_image(uid())
        assert fds() == before + 1
    assert fds() == before
    with pytest.raises(StoreError, match="closed"):
        store.list_images()
    store.close()  # twice is fine
