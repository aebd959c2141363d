"""Deterministic "guest-like" memory content: code, text, zeros and noise."""
from __future__ import annotations

import functools
import glob
import os
import random
import sysconfig
from typing import Iterator

PAGE = 4096
MIN_EXTENT, MAX_EXTENT = 4 << 10, 2 << 20
# Byte-share targets per kind; a deficit scheduler keeps samples close to them.
TARGETS = {"exe": 0.35, "text": 0.20, "zero": 0.30, "rand": 0.15}


def _read_pool(paths: list[str], cap: int, per_file: int) -> bytes:
    # Sorted inputs + per-file and total caps make the pool identical on
    # machines with the same package set; missing/unreadable files are skipped.
    parts, total, seen = [], 0, set()
    for p in paths:
        real = os.path.realpath(p)
        if real in seen or not os.path.isfile(real):
            continue
        seen.add(real)
        try:
            with open(real, "rb") as f:
                data = f.read(per_file)
        except OSError:
            continue
        parts.append(data[: cap - total])
        total += len(parts[-1])
        if total >= cap:
            break
    pool = b"".join(parts)
    if len(pool) < MAX_EXTENT:  # fallback so slicing always works
        pool += b"".join(b"fastsave filler line %08d\n" % i for i in range(80000))
    return pool


@functools.lru_cache(maxsize=None)
def exe_pool() -> bytes:
    libs = sorted(glob.glob("/usr/lib/x86_64-linux-gnu/*.so*"))
    bins = sorted(glob.glob("/usr/bin/*"))
    return _read_pool(libs + bins, 32 << 20, 1 << 20)


@functools.lru_cache(maxsize=None)
def text_pool() -> bytes:
    paths = sorted(glob.glob("/usr/share/common-licenses/*"))
    paths += sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    docs = sorted(glob.glob("/usr/share/doc/**/*", recursive=True))
    paths += [p for p in docs if not p.endswith((".gz", ".xz", ".bz2", ".png", ".jpg"))]
    return _read_pool(paths, 8 << 20, 256 << 10)


def _extents(seed: int) -> Iterator[bytes | memoryview]:
    # Infinite, so any prefix length gives the same leading bytes.
    rng = random.Random(seed)
    pools = {"exe": memoryview(exe_pool()), "text": memoryview(text_pool())}
    zeros = memoryview(bytes(MAX_EXTENT))  # shared, never copied per extent
    have = dict.fromkeys(TARGETS, 0)
    total = 0
    while True:
        n = rng.randrange(MIN_EXTENT, MAX_EXTENT + 1, PAGE)
        # Choose among kinds that are behind target, weighted by how far behind,
        # so even small samples have roughly the target composition.
        deficits = [max(TARGETS[k] * (total + n) - have[k], 0.0) for k in TARGETS]
        kind = rng.choices(list(TARGETS), weights=deficits)[0]
        have[kind] += n
        total += n
        if kind == "zero":
            yield zeros[:n]
        elif kind == "rand":
            yield rng.randbytes(n)
        else:
            pool = pools[kind]
            off = rng.randrange(0, len(pool) - n + 1)
            yield pool[off:off + n]


def _pieces(size: int, seed: int, piece: int) -> Iterator[list[bytes | memoryview]]:
    # Group extent slices into lists worth `piece` bytes; joining a list once
    # is far cheaper than growing and trimming a buffer.
    parts: list[bytes | memoryview] = []
    have, left = 0, size
    for ext in _extents(seed):
        if left <= 0:
            break
        ext = memoryview(ext)[:left]
        left -= len(ext)
        while ext:
            take = ext[:piece - have]
            parts.append(take)
            have += len(take)
            ext = ext[len(take):]
            if have == piece:
                yield parts
                parts, have = [], 0
    if parts:
        yield parts


def mixed_chunks(size: int, seed: int = 0, piece: int = 8 << 20) -> Iterator[bytes]:
    """Yield `size` bytes in `piece`-sized chunks (last may be shorter)."""
    for parts in _pieces(size, seed, piece):
        yield b"".join(parts)


def mixed_bytes(size: int, seed: int = 0) -> bytes:
    # One join over all extents: a single big allocation, no intermediate copies.
    return b"".join(p for parts in _pieces(size, seed, max(size, 1)) for p in parts)


def write_mixed_file(path: str | os.PathLike[str], size: int, seed: int = 0) -> None:
    with open(path, "wb") as f:
        for chunk in mixed_chunks(size, seed):
            f.write(chunk)
