"""Limits of the engine (FS_*_MAX in csrc/fastsave.h), the error kinds as the
extension exposes them, and images given as open file descriptors."""
from __future__ import annotations

import os
import struct
import time

import pytest

from conftest import CHUNK, sample
from fastsave import ImageCorrupt, engine, errors
from fastsave._native import lib
from testkit.engine_io import restore_bytes, save_bytes
from testkit.xxh3 import xxh3 as load_xxh3

MIB = 1 << 20
TRAILER = 128


# ---------------------------------------------------------------- error kinds

def test_error_kinds_are_the_c_constants():
    assert (errors._IO, errors._CORRUPT, errors._TRUNCATED, errors._VERSION, errors._CANCELLED,
            errors._ARG, errors._NOMEM, errors._NOT_IMAGE) == (
        lib.FS_ERR_IO, lib.FS_ERR_CORRUPT, lib.FS_ERR_TRUNCATED, lib.FS_ERR_VERSION,
        lib.FS_ERR_CANCELLED, lib.FS_ERR_ARG, lib.FS_ERR_NOMEM, lib.FS_ERR_NOT_IMAGE)
    e = errors.error_from_c(lib.FS_ERR_TRUNCATED, 0, -1, 5, "ends early", "x.img")
    assert isinstance(e, errors.ImageTruncated) and e.offset == 5
    assert isinstance(errors.error_from_c(lib.FS_ERR_ARG, 22, -1, -1, "bad", None), ValueError)


# ---------------------------------------------------------------- option limits

@pytest.mark.parametrize("kw, named", [
    ({"threads": 100000}, ["100000", "256"]),
    ({"threads": 1 << 40}, [str(1 << 40), "256"]),
    ({"threads": 0}, ["0", "256"]),
    ({"chunk_size": 1 << 40}, [str(1 << 40), "67108864"]),
    ({"chunk_size": (64 << 20) + 4096}, ["67112960", "67108864"]),
    ({"chunk_size": CHUNK + 1}, ["65537", "4096"]),
    ({"slots": 10 ** 6}, ["1000000", "4096"]),
    ({"slots": 64, "chunk_size": 64 << 20, "mode": "zstd", "threads": 1}, ["slots 64", "1024 MiB"]),
    ({"level": 22, "chunk_size": 64 << 20, "mode": "zstd", "threads": 1}, ["level 22", "1024 MiB"]),
    ({"level": 1000}, ["1000", "22"]),
    ({"level": 1 << 40}, [str(1 << 40)]),
])
def test_save_refuses_options_beyond_the_limits(tmp_path, kw, named):
    with pytest.raises(ValueError) as err:
        save_bytes(b"data" * 100, tmp_path / "img", **kw)
    for word in named:
        assert word in str(err.value), (word, str(err.value))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_image(tmp_path):
    data = sample("text", 3 * CHUNK + 5)
    path = tmp_path / "img"
    save_bytes(data, path, mode="zstd", chunk_size=CHUNK)
    return path, data


@pytest.mark.parametrize("kw, named", [
    ({"threads": 1000}, ["1000", "256"]),
    ({"threads": -1}, ["-1", "256"]),
    ({"slots": 10 ** 6}, ["1000000", "4096"]),
])
def test_restore_refuses_options_beyond_the_limits(small_image, kw, named):
    path, _ = small_image
    with pytest.raises(ValueError) as err:
        restore_bytes(path, **kw)
    for word in named:
        assert word in str(err.value), (word, str(err.value))


def test_many_threads_with_the_largest_chunks_stay_within_the_buffer_limit(tmp_path):
    data = sample("mixed", 3 * MIB + 11)
    path = tmp_path / "img"
    stats = save_bytes(data, path, mode="zstd", chunk_size=64 << 20, threads=256)
    # 1 GiB of buffers holds seven slots of a 64 MiB chunk and its compressed copy
    assert 1 <= stats.threads <= 6
    job = engine.Job()
    assert restore_bytes(path, threads=256, job=job) == data
    assert 1 <= job.stats.threads <= 6


def test_usable_cpus_never_exceed_the_thread_limit(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(1000)))
    assert engine.usable_cpus() == lib.FS_THREADS_MAX


# ---------------------------------------------------------------- index limit

def _craft_sparse(src: bytes, dst, count: int) -> None:
    """A copy of `src` whose metadata claims `count` chunks, with an index
    frame of the size that implies, as a sparse file. Header, metadata and
    trailer checksums are right; the index entries are holes."""
    xxh3 = load_xxh3()[0]
    tail = bytearray(src[-TRAILER:])
    meta_off, index_off = struct.unpack_from("<QQ", tail, 8 + 16)
    head = bytearray(src[:index_off])
    clen = struct.unpack_from("<I", head, meta_off + 4)[0]
    c = meta_off + 8
    chunk_size = struct.unpack_from("<I", head, c + 24)[0]
    struct.pack_into("<Q", head, c + 40, count * chunk_size)
    struct.pack_into("<Q", head, c + clen - 8, xxh3(head[c:c + clen - 8]))
    index_len = 24 + 24 * count + 8
    trailer_off = index_off + index_len
    struct.pack_into("<Q", tail, 8 + 32, trailer_off)
    struct.pack_into("<Q", tail, 0 + 8, xxh3(tail[16:]))
    with open(dst, "wb") as f:
        f.write(head)
        f.write(struct.pack("<II8sQ", 0x184D2A5E, index_len - 8, b"FSV-INDX", count))
        f.truncate(trailer_off)
        f.seek(trailer_off)
        f.write(tail)


@pytest.mark.parametrize("count", [170_000_000, lib.FS_CHUNKS_MAX + 1])
def test_sparse_image_claiming_too_many_chunks_is_refused_before_reading_its_index(
        tmp_path, small_image, count):
    src, _ = small_image
    path = tmp_path / "sparse"
    _craft_sparse(src.read_bytes(), path, count)
    assert path.stat().st_size > 24 * count  # the file's size would allow such an index
    t0 = time.monotonic()
    for call in (engine.inspect, engine.verify, restore_bytes):
        with pytest.raises(ImageCorrupt) as err:
            call(path)
        assert str(count) in str(err.value) and str(lib.FS_CHUNKS_MAX) in str(err.value), str(err.value)
        assert err.value.path == str(path)
    assert time.monotonic() - t0 < 5  # no gigabytes of index were read


def test_image_at_the_chunk_limit_is_read(tmp_path, small_image):
    src, _ = small_image
    path = tmp_path / "sparse"
    _craft_sparse(src.read_bytes(), path, lib.FS_CHUNKS_MAX)
    with pytest.raises(ImageCorrupt, match="index checksum"):
        engine.inspect(path)


# ---------------------------------------------------------------- images as fds

def test_inspect_verify_restore_take_an_fd(small_image):
    path, data = small_image
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 7, os.SEEK_SET)
        info = engine.inspect(fd)
        assert info.path == f"<fd {fd}>"
        assert info.stream_length == len(data) and info.xml == engine.inspect(path).xml
        assert engine.inspect(fd, name="vm.img").path == "vm.img"
        report = engine.verify(fd)
        assert report.info.path == f"<fd {fd}>" and report.stats.bytes_out == len(data)
        assert restore_bytes(fd) == data
        assert os.lseek(fd, 0, os.SEEK_CUR) == 7  # read with pread only
        os.fstat(fd)  # and left open
    finally:
        os.close(fd)


def test_path_behaviour_is_unchanged(small_image):
    path, data = small_image
    assert engine.inspect(path).path == str(path)
    assert engine.inspect(str(path)).path == str(path)
    assert restore_bytes(path) == data


@pytest.mark.parametrize("name", [None, "guest.img"])
def test_errors_on_an_fd_name_it(tmp_path, small_image, name):
    path, _ = small_image
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    bad = tmp_path / "bad"
    bad.write_bytes(raw)
    fd = os.open(bad, os.O_RDONLY)
    try:
        want = name or f"<fd {fd}>"
        for call in (engine.inspect, engine.verify, restore_bytes):
            kw = {} if name is None else {"name": name}
            try:
                call(fd, **kw)
            except ImageCorrupt as e:
                assert str(e).startswith(f"{want}: ") and e.path == want, str(e)
            else:
                if call is not engine.inspect:  # a flipped chunk byte passes inspect only
                    pytest.fail(f"{call} accepted a damaged image")
    finally:
        os.close(fd)


def test_bad_fds(tmp_path):
    with pytest.raises(ValueError):
        engine.inspect(-1)
    with pytest.raises(TypeError):
        engine.inspect(True)
    r, w = os.pipe()
    try:
        with pytest.raises(errors.NotAnImage, match=f"<fd {r}>"):
            engine.inspect(r)
    finally:
        os.close(r)
        os.close(w)
