"""fastsave: fast, verified, atomic save and restore of QEMU virtual machines."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _pkg_version

try:
    __version__ = _pkg_version("fastsave")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+src"

from .engine import (
    EngineOptions,
    ImageInfo,
    Job,
    Stats,
    VerifyReport,
    cleanup,
    inspect,
    restore_stream,
    save_stream,
    usable_cpus,
    verify,
)
from .errors import (
    Cancelled,
    FastsaveError,
    ImageCorrupt,
    ImageError,
    ImageTruncated,
    NotAnImage,
    UnsupportedImageVersion,
)

# The libvirt layer imports libvirt-python; engine-only users need not have it.
_MANAGED = ("managed_save", "has_managed_save_image", "managed_save_remove", "start",
            "autostart", "Options", "image_store", "managed_save_get_xml_desc",
            "managed_save_define_xml")


def __getattr__(name: str) -> object:
    if name == "autostart":
        from .hostwide import autostart
        return autostart
    if name in _MANAGED:
        from . import managed
        return getattr(managed, name)
    if name in ("open_connection", "prepare_embed_root"):
        from . import connect
        return getattr(connect, name)
    raise AttributeError(f"module 'fastsave' has no attribute {name!r}")


__all__ = [
    "__version__",
    *_MANAGED,
    "open_connection",
    "prepare_embed_root",
    "save_stream",
    "restore_stream",
    "EngineOptions",
    "usable_cpus",
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
