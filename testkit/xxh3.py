"""XXH3-64 from the system's libxxhash (libxxhash-dev, installed by CI): an
independent hash for tests that forge images with correct checksums."""
from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import pytest


def xxh3() -> tuple[Callable[[bytes], int], Callable[[bytes, int], int]]:
    """(hash, hash with seed); the calling test is skipped, with the reason,
    where libxxhash is missing."""
    name = ctypes.util.find_library("xxhash") or "libxxhash.so.0"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        pytest.skip("libxxhash is not installed (apt-get install libxxhash-dev)")
    lib.XXH3_64bits.restype = ctypes.c_uint64
    lib.XXH3_64bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.XXH3_64bits_withSeed.restype = ctypes.c_uint64
    lib.XXH3_64bits_withSeed.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64]
    return (lambda b: lib.XXH3_64bits(bytes(b), len(b)),
            lambda b, seed: lib.XXH3_64bits_withSeed(bytes(b), len(b), seed))
