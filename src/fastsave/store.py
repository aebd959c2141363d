"""The image store: one image per domain UUID in a private directory, with a
lock per domain so that two calls never save or restore one domain at once."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import uuid as _uuid
from collections.abc import Iterator

from . import engine

__all__ = ["ImageStore", "StoreError", "DomainBusy", "default_image_dir"]

SYSTEM_DIR = "/var/lib/fastsave/images"
IMAGE_SUFFIX = ".fsimg"


class StoreError(Exception):
    """The store directory or one of its files is unsafe or unusable."""


class DomainBusy(StoreError):
    """Another fastsave call holds this domain's lock."""


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


class ImageStore:
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self._open_dir()
        engine.cleanup(self.directory)

    def _open_dir(self) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        try:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"image directory {self.directory} is not a plain directory "
                             f"(a symlink?): {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise StoreError(f"image directory {self.directory} is owned by uid {st.st_uid}, "
                                 f"not by this user ({os.geteuid()})")
            if st.st_mode & 0o077:
                os.fchmod(fd, 0o700)
        finally:
            os.close(fd)

    def image_path(self, dom_uuid: str) -> str:
        return os.path.join(self.directory, canonical_uuid(dom_uuid) + IMAGE_SUFFIX)

    def _side_path(self, dom_uuid: str, kind: str) -> str:
        return os.path.join(self.directory, f".{canonical_uuid(dom_uuid)}.{kind}")

    def pending_path(self, dom_uuid: str) -> str:
        """Where a save in progress writes; it becomes the image on commit."""
        return self._side_path(dom_uuid, "pending")

    def commit_pending(self, dom_uuid: str) -> None:
        os.rename(self.pending_path(dom_uuid), self.image_path(dom_uuid))
        self._sync_dir()

    def discard_pending(self, dom_uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pending_path(dom_uuid))

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
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
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
        """Removes the image durably; True if there was one."""
        try:
            os.unlink(self.image_path(dom_uuid))
        except FileNotFoundError:
            return False
        self._sync_dir()
        return True

    def _sync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def list_images(self) -> list[tuple[str, str]]:
        """(uuid, path) of every image in the store."""
        out = []
        for name in sorted(os.listdir(self.directory)):
            if name.endswith(IMAGE_SUFFIX) and not name.startswith("."):
                try:
                    u = canonical_uuid(name[: -len(IMAGE_SUFFIX)])
                except ValueError:
                    continue
                out.append((u, os.path.join(self.directory, name)))
        return out

    @contextlib.contextmanager
    def lock(self, dom_uuid: str, name: str = "") -> Iterator[None]:
        """Holds the domain's lock, or raises DomainBusy at once. The lock file
        is removed on release when the domain has nothing left in the store,
        so the store does not collect lock files of domains long gone."""
        path = self._side_path(dom_uuid, "lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
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
            try:
                current = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        try:
            yield
        finally:
            try:
                if not self._has_state(dom_uuid):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)  # while still holding it: see the check above
            finally:
                os.close(fd)

    def _has_state(self, dom_uuid: str) -> bool:
        return any(os.path.lexists(p) for p in (
            self.image_path(dom_uuid), self.pending_path(dom_uuid),
            self._side_path(dom_uuid, "saving"), self._side_path(dom_uuid, "token")))

    # A save in progress leaves a marker; one found under a free lock means the
    # saving process died, and the caller may have a paused guest to resume.
    def mark_saving(self, dom_uuid: str, info: dict[str, object]) -> None:
        self._write_small(self._side_path(dom_uuid, "saving"), json.dumps(info))

    def take_saving_mark(self, dom_uuid: str) -> dict[str, object] | None:
        path = self._side_path(dom_uuid, "saving")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            data = {}
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return data if isinstance(data, dict) else {}

    # A restore token lets the libvirt hook tell fastsave's own start from others.
    def issue_token(self, dom_uuid: str) -> str:
        token = _uuid.uuid4().hex
        self._write_small(self._side_path(dom_uuid, "token"), token)
        return token

    def revoke_token(self, dom_uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._side_path(dom_uuid, "token"))

    def _write_small(self, path: str, text: str) -> None:
        tmp = path + ".new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
