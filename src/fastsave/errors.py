"""Exceptions raised by fastsave, and the one helper that maps C failures to them."""

from __future__ import annotations

import os

from ._native import lib

__all__ = [
    "FastsaveError",
    "ImageError",
    "ImageCorrupt",
    "ImageTruncated",
    "UnsupportedImageVersion",
    "NotAnImage",
    "Cancelled",
]


class FastsaveError(Exception):
    """Base class of fastsave's own errors (I/O errors are plain OSError)."""


class ImageError(FastsaveError):
    """An image failed a check. `path`, `offset` and `chunk` locate the fault."""

    def __init__(
        self, message: str, path: str | None = None, offset: int | None = None,
        chunk: int | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset
        self.chunk = chunk


class ImageCorrupt(ImageError):
    """Bytes of the image differ from what was written (checksum or structure)."""


class ImageTruncated(ImageCorrupt):
    """The image ends early: its trailer or part of its data is missing."""


class UnsupportedImageVersion(ImageError):
    """The image was written in a format major version this fastsave cannot read."""


class NotAnImage(ImageError):
    """The file is not a save image at all."""


class Cancelled(FastsaveError):
    """The call was cancelled through its Job."""


# C error kinds: FS_ERR_* of csrc/fastsave.h, as the extension exposes them.
_IO = lib.FS_ERR_IO
_CORRUPT = lib.FS_ERR_CORRUPT
_TRUNCATED = lib.FS_ERR_TRUNCATED
_VERSION = lib.FS_ERR_VERSION
_CANCELLED = lib.FS_ERR_CANCELLED
_ARG = lib.FS_ERR_ARG
_NOMEM = lib.FS_ERR_NOMEM
_NOT_IMAGE = lib.FS_ERR_NOT_IMAGE


def error_from_c(kind: int, err: int, chunk: int, offset: int, msg: str, path: str | None) -> Exception:
    """Turns the fs_error a C call filled in into the exception to raise.

    `path` names the image in messages and on the exception: a path, or for
    a caller's open file descriptor whatever name the caller gave it.
    """
    where = path or "<fd>"
    loc = ""
    if chunk >= 0 and f"chunk {chunk}" not in msg:
        loc += f" (chunk {chunk})"
    if offset >= 0 and "offset" not in msg:
        loc += f" (offset {offset})"
    text = f"{where}: {msg}{loc}"
    off = offset if offset >= 0 else None
    chk = chunk if chunk >= 0 else None
    if kind == _CORRUPT:
        return ImageCorrupt(text, path, off, chk)
    if kind == _TRUNCATED:
        return ImageTruncated(text, path, off, chk)
    if kind == _VERSION:
        return UnsupportedImageVersion(text, path, off, chk)
    if kind == _NOT_IMAGE:
        return NotAnImage(text, path, off, chk)
    if kind == _CANCELLED:
        return Cancelled(text)
    if kind == _ARG:
        return ValueError(msg)
    if kind == _NOMEM:
        return MemoryError(msg)
    code = err or 5
    return OSError(code, f"{msg}", path) if path else OSError(code, f"{os.strerror(code)}: {msg}")
