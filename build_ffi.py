"""cffi build script: compiles csrc/ into the extension module fastsave._native."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"


def _pkg_config(*args: str) -> list[str]:
    try:
        out = subprocess.run(
            ["pkg-config", *args, "libzstd"], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return shlex.split(out)


def _sources() -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in CSRC.glob("*.c"))


ffibuilder = FFI()
ffibuilder.cdef((CSRC / "fastsave.h").read_text())
_cflags = _pkg_config("--cflags")
_libs = _pkg_config("--libs") or ["-lzstd"]
ffibuilder.set_source(
    "fastsave._native",
    '#include "fs_internal.h"\n',
    sources=_sources(),
    include_dirs=[str(CSRC)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-pthread", *_cflags],
    extra_link_args=["-pthread", *_libs],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
