"""fastsave: fast, verified, atomic save and restore of QEMU virtual machines."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _pkg_version

try:
    __version__ = _pkg_version("fastsave")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+src"

from .engine import ImageInfo, Job, Stats, VerifyReport, cleanup, inspect, restore_stream, save_stream, verify
from .errors import (
    Cancelled,
    FastsaveError,
    ImageCorrupt,
    ImageError,
    ImageTruncated,
    NotAnImage,
    UnsupportedImageVersion,
)

__all__ = [
    "__version__",
    "save_stream",
    "restore_stream",
    "verify",
    "inspect",
    "cleanup",
    "Job",
    "Stats",
    "ImageInfo",
    "VerifyReport",
    "FastsaveError",
    "ImageError",
    "ImageCorrupt",
    "ImageTruncated",
    "UnsupportedImageVersion",
    "NotAnImage",
    "Cancelled",
]
