"""The image store: one image per domain UUID in a private directory, with a
lock per domain so that two calls never save or restore one domain at once.

The store directory is checked once and opened; every operation of the store
then goes through that directory's fd, so renaming or replacing the path
later cannot redirect it. Only `pending_path` hands out a path (the engine
child writes there), and it first checks that the path still leads to the
opened directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import stat
import time
import uuid as _uuid
from collections.abc import Iterator
from types import TracebackType

from . import engine
from .config import CONFIG_PATH, HOOK_DIR, STORE_MARKER, SYSTEM_DIR, ConfigError, hook_installed
from .config import load as load_config

__all__ = ["ImageStore", "StoreError", "DomainBusy", "UnguardedStore", "Publication",
           "default_image_dir", "open_store", "require_guarded", "SYSTEM_DIR", "IMAGE_SUFFIX",
           "STORE_MARKER", "PUBLISHED_KIND"]

IMAGE_SUFFIX = ".fsimg"
_ORPHAN = re.compile(r"^\.([0-9a-f-]{36})\.orphaned-[0-9]+(?:-[0-9]+)?" + re.escape(IMAGE_SUFFIX) + "$")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# The record of an image made visible at libvirt's managed-save path (published.py).
PUBLISHED_KIND = "published"


@dataclasses.dataclass(frozen=True)
class Publication:
    """What the store knows of an image's link at libvirt's managed-save path.

    `linked`: the link at `path` is there now and is the image itself (same
    inode): derived from the file system at every look, never trusted from
    the record alone. `consumed`: the link was made and is gone (libvirt
    restored or discarded the state: force-boot, managedsave-remove,
    undefine --managed-save), so the store's copy is stale."""

    directory: str
    name: str
    linked: bool
    consumed: bool

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.name)


class StoreError(Exception):
    """The store directory or one of its files is unsafe or unusable."""


class DomainBusy(StoreError):
    """Another fastsave call holds this domain's lock."""


class UnguardedStore(StoreError):
    """A save on qemu:///system into a store the libvirt hook does not guard."""


def default_image_dir(kind: str, query: dict[str, str]) -> str:
    """Where images live for a connection, unless FASTSAVE_IMAGE_DIR says otherwise."""
    env = os.environ.get("FASTSAVE_IMAGE_DIR")
    if env:
        return env
    if kind == "embed":
        return os.path.join(query["root"], "fastsave", "images")
    if kind == "session":
        base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
        return os.path.join(base, "fastsave", "images")
    return SYSTEM_DIR


def canonical_uuid(value: str) -> str:
    """Image names come from UUIDs only, never from domain names."""
    return str(_uuid.UUID(value))


def require_guarded(directory: str | os.PathLike[str], *, config_path: str = CONFIG_PATH,
                    hook_dir: str = HOOK_DIR) -> None:
    """Saves on qemu:///system refuse stores the guard does not cover: while
    the libvirt hook is installed, the store must be the system store or be
    listed in the configuration file, which the hook reads at every start."""
    if not hook_installed(hook_dir):
        return
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        raise UnguardedStore(f"{e}; saves are refused until it is fixed, since the libvirt "
                             f"hook cannot guard saved states meanwhile") from None
    real = os.path.realpath(os.fspath(directory))
    if real not in {os.path.realpath(s) for s in cfg.guarded}:
        raise UnguardedStore(
            f"image store {real} is not listed in {cfg.path}, so the libvirt hook would not "
            f"stop a plain start from discarding what is saved there; add the line "
            f"'store = {real}' to {cfg.path} (or run 'fastsave install-hook --store {real}')")


def open_store(kind: str, query: dict[str, str], image_dir: str | None = None, *,
               saving: bool = False, config_path: str = CONFIG_PATH,
               hook_dir: str = HOOK_DIR) -> ImageStore:
    """The store of a connection of this kind (see virt.connection_kind), or
    `image_dir`. `saving`: the caller is about to save into it; on the system
    connection that needs a store the hook guards (checked before the
    directory is created)."""
    directory = image_dir or default_image_dir(kind, query)
    if saving and kind == "system":
        require_guarded(directory, config_path=config_path, hook_dir=hook_dir)
    store = ImageStore(directory)
    if saving and kind == "system":
        try:  # the same check on the path as opened
            require_guarded(store.directory, config_path=config_path, hook_dir=hook_dir)
        except BaseException:
            store.close()
            raise
    return store


def _check_ancestor(fd: int, where: str) -> None:
    """A directory above the store: only root or we may change what its names
    lead to. Writable by others is accepted only with the sticky bit, where
    others cannot rename or remove entries that are not theirs (and the next
    component's owner is checked in turn)."""
    st = os.fstat(fd)
    if st.st_uid not in (0, os.geteuid()):
        raise StoreError(f"{where}, above the image store, is owned by uid {st.st_uid}: that "
                         f"user could swap the store for another directory; refusing it")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise StoreError(f"{where}, above the image store, is writable by group or others "
                         f"(mode {stat.S_IMODE(st.st_mode):o}) without the sticky bit: they "
                         f"could swap the store for another directory; refusing it")


def _open_store_dir(directory: str) -> tuple[int, str, bool]:
    """Opens the store directory after checking every directory above it,
    creating what is missing (the store itself 0700). Returns (fd, the path
    as checked, created). An existing store is never changed: one that is
    not ours or that others may read or write is refused."""
    path = os.path.abspath(directory)
    parent, leaf = os.path.split(path)
    if not leaf:
        raise StoreError("/ cannot be an image store")
    parent = os.path.realpath(parent)  # symlinks above are resolved once; below, none is followed
    path = os.path.join(parent, leaf)
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        where = "/"
        _check_ancestor(fd, where)
        names = [c for c in parent.split("/") if c] + [leaf]
        for i, name in enumerate(names):
            is_leaf = i == len(names) - 1
            created = False
            try:
                os.mkdir(name, 0o700 if is_leaf else 0o755, dir_fd=fd)
                created = True
            except FileExistsError:
                pass
            where = os.path.join(where, name)
            try:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    what = "image directory" if is_leaf else "directory above the image store"
                    raise StoreError(f"{what} {where} is not a plain directory (a symlink?); "
                                     f"refusing it") from None
                raise
            os.close(fd)
            fd = nfd
            if not is_leaf:
                _check_ancestor(fd, where)
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise StoreError(f"image directory {path} is owned by uid {st.st_uid}, not by this "
                             f"user ({os.geteuid()}); refusing it")
        if created:
            os.fchmod(fd, 0o700)  # whatever the umask
        elif st.st_mode & 0o077:
            raise StoreError(
                f"image directory {path} has mode {stat.S_IMODE(st.st_mode):o}; an image store "
                f"must be private to its owner (images hold guest memory) and fastsave does not "
                f"change an existing directory: give it a directory of its own (a new one is "
                f"created 0700), or run 'chmod 700 {path}' if nothing else needs access to it")
        return fd, path, created
    except BaseException:
        os.close(fd)
        raise


class ImageStore:
    """An opened store directory. It holds an fd: close() it, or use it as a
    context manager."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._fd = -1
        self._fd, self.directory, created = _open_store_dir(os.fspath(directory))
        try:
            if created:
                self.mark()
            engine.cleanup(self._fd_path())
        except BaseException:
            self.close()
            raise

    # -- the opened directory

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise StoreError(f"image store {self.directory} is closed")
        return self._fd

    def _fd_path(self) -> str:
        """A path to the opened directory itself, for this process only."""
        proc = f"/proc/self/fd/{self.fd}"
        return proc if os.path.isdir("/proc/self/fd") else self.directory

    def _sync_dir(self) -> None:
        os.fsync(self.fd)

    def _lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _check_path(self) -> None:
        """The path still leads to the opened directory."""
        try:
            st = os.stat(self.directory, follow_symlinks=False)
        except OSError:
            st = None
        mine = os.fstat(self.fd)
        if st is None or (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino):
            raise StoreError(f"image directory {self.directory} was moved or replaced after it "
                             f"was opened; refusing to write through its path")

    @property
    def marked(self) -> bool:
        """The store carries its marker, by which the hook knows it is mounted."""
        return self._lstat(STORE_MARKER) is not None

    def mark(self) -> None:
        """Writes the marker (see config.STORE_MARKER) if it is missing."""
        if self.marked:
            return
        self.write_small(STORE_MARKER, "fastsave image store; the libvirt hook refuses every "
                                        "domain start while this file is missing\n")
        self._sync_dir()

    # -- names

    def _image_name(self, dom_uuid: str) -> str:
        return canonical_uuid(dom_uuid) + IMAGE_SUFFIX

    @staticmethod
    def _side_name(dom_uuid: str, kind: str) -> str:
        return f".{canonical_uuid(dom_uuid)}.{kind}"

    def image_path(self, dom_uuid: str) -> str:
        return os.path.join(self.directory, self._image_name(dom_uuid))

    def pending_path(self, dom_uuid: str) -> str:
        """Where a save in progress writes (the engine child, by path); it
        becomes the image on commit. Refused once the path no longer leads to
        the opened directory."""
        self._check_path()
        return os.path.join(self.directory, self._side_name(dom_uuid, "pending"))

    def scratch_path(self, dom_uuid: str) -> str:
        """A private path for a short-lived file that another process (libvirtd)
        must reach by name; checked like pending_path. Its user removes it."""
        self._check_path()
        return os.path.join(self.directory, self._side_name(dom_uuid, "scratch"))

    # -- images

    def commit_pending(self, dom_uuid: str) -> None:
        pending = self._side_name(dom_uuid, "pending")
        st = self._lstat(pending)
        if st is None:
            raise FileNotFoundError(errno.ENOENT, "no pending image in the opened store directory",
                                    os.path.join(self.directory, pending))
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise StoreError(f"{os.path.join(self.directory, pending)} is not a regular file of "
                             f"this user; refusing to commit it")
        os.rename(pending, self._image_name(dom_uuid), src_dir_fd=self.fd, dst_dir_fd=self.fd)
        self._sync_dir()

    def discard_pending(self, dom_uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._side_name(dom_uuid, "pending"), dir_fd=self.fd)

    def has_image(self, dom_uuid: str) -> bool:
        try:
            os.close(self.open_image(dom_uuid))
        except FileNotFoundError:
            return False
        return True

    def open_image(self, dom_uuid: str) -> int:
        """Opens the image without following links and checks the opened file:
        a regular file of this user that nobody else may write."""
        path = self.image_path(dom_uuid)
        try:
            fd = os.open(self._image_name(dom_uuid),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise StoreError(f"{path} is a symbolic link; refusing it") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            os.close(fd)
            raise StoreError(f"{path} is not a regular file owned and writable only by this "
                             f"user (uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); refusing it")
        return fd

    def remove_image(self, dom_uuid: str) -> bool:
        """Removes the image durably, libvirt's link to it first (see
        unpublish); True if there was one."""
        self.unpublish(dom_uuid)
        try:
            os.unlink(self._image_name(dom_uuid), dir_fd=self.fd)
        except FileNotFoundError:
            return False
        self._sync_dir()
        return True

    def _names(self) -> list[str]:
        # A file description of our own: listing through the shared one would
        # move its position under other threads.
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def list_images(self) -> list[tuple[str, str]]:
        """(uuid, path) of every image in the store."""
        out = []
        for name in self._names():
            if name.endswith(IMAGE_SUFFIX) and not name.startswith("."):
                try:
                    u = canonical_uuid(name[: -len(IMAGE_SUFFIX)])
                except ValueError:
                    continue
                out.append((u, os.path.join(self.directory, name)))
        return out

    def quarantine_image(self, dom_uuid: str) -> str | None:
        """Moves the image durably out of the way of every start (managed
        starts, restore-all, the hook): to `.UUID.orphaned-<unix time>.fsimg`,
        kept for inspection and listed by list_orphans. Returns the new path,
        or None if there was no image."""
        src = self._image_name(dom_uuid)
        if self._lstat(src) is None:
            self.unpublish(dom_uuid)
            return None
        self.unpublish(dom_uuid)  # first: libvirt must not find it either
        base = f".{canonical_uuid(dom_uuid)}.orphaned-{int(time.time())}"
        n = 0
        while self._lstat(dst := base + (f"-{n}" if n else "") + IMAGE_SUFFIX) is not None:
            n += 1
        os.rename(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        self._sync_dir()
        return os.path.join(self.directory, dst)

    def list_orphans(self) -> list[tuple[str, str]]:
        """(uuid, path) of every quarantined image, oldest first per domain."""
        out = []
        for name in self._names():
            m = _ORPHAN.match(name)
            if m:
                try:
                    out.append((canonical_uuid(m.group(1)), os.path.join(self.directory, name)))
                except ValueError:
                    continue
        return out

    # -- publication: a hard link to the image at libvirt's managed-save path
    #
    # Order, and what each crash leaves: the record (linked: false) is written
    # first, then the link made under a temporary name and renamed into place,
    # then the record says linked: true. A record without its link before
    # that means nothing (not published); a link is always known by a record,
    # so every removal of the image finds it. Only a link that was made and
    # is gone means libvirt took the state (Publication.consumed).

    def _pub_tmp(self, dom_uuid: str) -> str:
        return f".fastsave-{canonical_uuid(dom_uuid)}.tmp"

    def _read_publication(self, dom_uuid: str) -> dict[str, object] | None:
        try:
            data = json.loads(self._read_small(self._side_name(dom_uuid, PUBLISHED_KIND)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _open_libvirt_dir(directory: str) -> int:
        """libvirt's save directory: a plain directory only root (or we) may change."""
        fd = os.open(os.path.realpath(os.path.dirname(directory)) + "/" + os.path.basename(directory),
                     _DIR_FLAGS)
        st = os.fstat(fd)
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            os.close(fd)
            raise StoreError(f"{directory} is not a directory only root may change "
                             f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); not linking "
                             f"an image into it")
        return fd

    def publish(self, dom_uuid: str, directory: str, name: str) -> str | None:
        """Makes the image visible as `directory/name` by a hard link (no
        copy), atomically (link to a temporary name, rename). Returns the
        path, or None when a hard link is impossible there (another file
        system). A file already at that path is replaced: a domain that ran
        after it was written has no saved state in it (libvirt's own rule)."""
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise StoreError(f"{name!r} cannot name a file in {directory}")
        image = self._image_name(dom_uuid)
        st = self._lstat(image)
        if st is None:
            raise FileNotFoundError(errno.ENOENT, "no image to publish", self.image_path(dom_uuid))
        dfd = self._open_libvirt_dir(directory)
        try:
            record = {"dir": directory, "name": name, "dev": st.st_dev, "ino": st.st_ino}
            self.write_small(self._side_name(dom_uuid, PUBLISHED_KIND),
                              json.dumps(dict(record, linked=False)))
            self._sync_dir()
            tmp = self._pub_tmp(dom_uuid)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dfd)
            try:
                os.link(image, tmp, src_dir_fd=self.fd, dst_dir_fd=dfd, follow_symlinks=False)
            except OSError as e:
                self._clear_publication(dom_uuid)
                if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    return None
                raise
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            os.fsync(dfd)
            self.write_small(self._side_name(dom_uuid, PUBLISHED_KIND),
                              json.dumps(dict(record, linked=True)))
            self._sync_dir()
            return os.path.join(directory, name)
        finally:
            os.close(dfd)

    def publication(self, dom_uuid: str) -> Publication | None:
        """The image's publication, or None if it has none (no image, no
        record, or a record of an earlier image)."""
        rec = self._read_publication(dom_uuid)
        st = self._lstat(self._image_name(dom_uuid))
        if not rec or st is None:
            return None
        try:
            directory, name = str(rec["dir"]), str(rec["name"])
            mine = (int(rec["dev"]), int(rec["ino"]))  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError):
            return None
        if mine != (st.st_dev, st.st_ino):
            return None  # the record of an image since replaced
        try:
            there = os.stat(os.path.join(directory, name), follow_symlinks=False)
            linked = stat.S_ISREG(there.st_mode) and (there.st_dev, there.st_ino) == mine
        except OSError:
            linked = False
        return Publication(directory, name, linked, bool(rec.get("linked")) and not linked)

    def unpublish(self, dom_uuid: str) -> None:
        """Removes libvirt's link to the image (at the recorded path, and a
        temporary one a crash left), if it is still the image or the one the
        record was made for, then the record. The store's image stays."""
        rec = self._read_publication(dom_uuid)
        if rec is None:
            return
        try:
            directory, name = str(rec["dir"]), str(rec["name"])
            ours = {(int(rec["dev"]), int(rec["ino"]))}  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError):
            self._clear_publication(dom_uuid)
            return
        st = self._lstat(self._image_name(dom_uuid))
        if st is not None:
            ours.add((st.st_dev, st.st_ino))
        try:
            dfd = self._open_libvirt_dir(directory)
        except FileNotFoundError:
            self._clear_publication(dom_uuid)
            return
        try:
            for n in (name, self._pub_tmp(dom_uuid)):
                try:
                    there = os.stat(n, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(there.st_mode) and (there.st_dev, there.st_ino) in ours:
                    os.unlink(n, dir_fd=dfd)
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._clear_publication(dom_uuid)

    def release_to_libvirt(self, dom_uuid: str) -> None:
        """libvirt is restoring the published image: the store lets go of it
        (its name and the record); libvirt's link keeps the data until
        libvirt removes it after the restore (or keeps it if that fails)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._image_name(dom_uuid), dir_fd=self.fd)
        self._clear_publication(dom_uuid)
        self._sync_dir()

    def _clear_publication(self, dom_uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._side_name(dom_uuid, PUBLISHED_KIND), dir_fd=self.fd)

    # -- locks

    @contextlib.contextmanager
    def lock(self, dom_uuid: str, name: str = "") -> Iterator[None]:
        """Holds the domain's lock, or raises DomainBusy at once. The lock file
        is removed on release when the domain has nothing left in the store,
        so the store does not collect lock files of domains long gone."""
        lock_name = self._side_name(dom_uuid, "lock")
        while True:
            fd = os.open(lock_name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=self.fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise DomainBusy(f"another fastsave operation is in progress on domain "
                                     f"{name or dom_uuid}") from None
                raise
            # The holder before us may have removed the file we opened: only
            # a lock on the file that is at the path now excludes others.
            st = self._lstat(lock_name)
            if st is not None and st.st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        try:
            yield
        finally:
            try:
                if not self._has_state(dom_uuid):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(lock_name, dir_fd=self.fd)  # still held: see the check above
            finally:
                os.close(fd)

    def _has_state(self, dom_uuid: str) -> bool:
        return any(self._lstat(n) is not None for n in (
            self._image_name(dom_uuid), self._side_name(dom_uuid, "pending"),
            self._side_name(dom_uuid, "saving"), self._side_name(dom_uuid, "token")))

    # -- saving marks: a save in progress leaves one; one found under a free
    # lock means the saving process died, and the caller may have a paused
    # guest to resume.

    def mark_saving(self, dom_uuid: str, info: dict[str, object]) -> None:
        self.write_small(self._side_name(dom_uuid, "saving"), json.dumps(info))

    def peek_saving_mark(self, dom_uuid: str) -> dict[str, object] | None:
        """The saving mark, left in place; None if there is none, {} if it is unreadable."""
        try:
            text = self._read_small(self._side_name(dom_uuid, "saving"))
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            data = json.loads(text)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def clear_saving_mark(self, dom_uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._side_name(dom_uuid, "saving"), dir_fd=self.fd)

    def take_saving_mark(self, dom_uuid: str) -> dict[str, object] | None:
        data = self.peek_saving_mark(dom_uuid)
        if data is not None:
            self.clear_saving_mark(dom_uuid)
        return data

    # -- restore tokens: they let the libvirt hook tell fastsave's own start from others.

    def issue_token(self, dom_uuid: str) -> str:
        token = _uuid.uuid4().hex
        self.write_small(self._side_name(dom_uuid, "token"), token)
        return token

    def revoke_token(self, dom_uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._side_name(dom_uuid, "token"), dir_fd=self.fd)

    # -- small files

    def _read_small(self, name: str) -> str:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.fd)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", name)
            return f.read(1 << 16).decode("utf-8", "replace")

    def write_small(self, name: str, text: str) -> None:
        """A small root-only file in the store, replaced atomically: a crash
        leaves the old text or the new one."""
        tmp = name + ".new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=self.fd)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.fd)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
