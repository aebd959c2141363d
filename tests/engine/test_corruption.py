"""Damaged images: every fault gives a specific exception that names the file
and where, never a crash, a hang or a wrong byte handed to the consumer."""
from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from conftest import CHUNK, sample
from fastsave import engine
from fastsave.errors import ImageCorrupt, ImageError, ImageTruncated, NotAnImage, UnsupportedImageVersion
from testkit.engine_io import restore_collect, save_bytes


def make_image(tmp_path: Path, mode: str, data: bytes) -> tuple[Path, bytes, engine.ImageInfo]:
    img = tmp_path / f"good-{mode}"
    save_bytes(data, img, mode=mode, chunk_size=CHUNK, xml="<domain><name>x</name></domain>",
               name="x")
    return img, img.read_bytes(), engine.inspect(img)


def check_rejected(path: Path, data: bytes, expected: type[ImageError]) -> ImageError:
    """The damaged image must fail inspect or restore with `expected`, and whatever
    the restore wrote before failing must be a true prefix of the stream."""
    out, err = restore_collect(path)
    assert isinstance(err, expected), f"{path.name}: got {err!r}"
    assert data.startswith(out)
    assert str(path) in str(err)
    with pytest.raises(expected):
        engine.verify(path)
    return err


def offsets_to_flip(raw: bytes, info: engine.ImageInfo, rnd: random.Random) -> list[int]:
    """Every byte outside the payload and the XML padding, and a spread inside them."""
    n = len(raw)
    pos = set(range(0, 92 + len(info.xml) + 1))
    pos |= set(range(info.payload_offset + info.payload_length, n))
    pos |= set(rnd.sample(range(92 + len(info.xml) + 1, info.payload_offset), 40))
    pos |= set(rnd.sample(range(info.payload_offset, info.payload_offset + info.payload_length), 300))
    return sorted(pos)


@pytest.mark.parametrize("mode", ["raw", "zstd", "auto"])
def test_any_single_byte_flip_is_detected(tmp_path, mode):
    data = sample("mixed", 4 * CHUNK + 333, seed=5) + sample("random", CHUNK)
    img, raw, info = make_image(tmp_path, mode, data)
    rnd = random.Random(11)
    bad = tmp_path / "bad"
    kinds: dict[str, int] = {}
    for off in offsets_to_flip(raw, info, rnd):
        b = bytearray(raw)
        b[off] ^= 1 << rnd.randrange(8)
        bad.write_bytes(b)
        out, err = restore_collect(bad)
        assert isinstance(err, ImageError), f"flip at {off}: {err!r}"
        assert data.startswith(out), f"flip at {off} let wrong bytes through"
        kinds[type(err).__name__] = kinds.get(type(err).__name__, 0) + 1
    assert set(kinds) <= {"ImageCorrupt", "ImageTruncated", "NotAnImage", "UnsupportedImageVersion"}
    assert kinds.get("ImageCorrupt", 0) > 300


@pytest.mark.parametrize("mode", ["raw", "zstd"])
def test_chunk_flip_names_the_chunk(tmp_path, mode):
    data = sample("random", 4 * CHUNK)
    img, raw, info = make_image(tmp_path, mode, data)
    b = bytearray(raw)
    # Chunks are stored uncompressed (random data), so chunk 2 sits at a known place.
    per_chunk = info.payload_length // 4
    off = info.payload_offset + 2 * per_chunk + per_chunk // 2
    b[off] ^= 0x40
    (tmp_path / "bad").write_bytes(b)
    err = check_rejected(tmp_path / "bad", data, ImageCorrupt)
    assert err.chunk == 2 and "chunk 2" in str(err)
    out, _ = restore_collect(tmp_path / "bad")
    assert out == data[: 2 * CHUNK]  # chunks 0 and 1 were verified and delivered, nothing more


@pytest.mark.parametrize("mode", ["raw", "zstd", "auto"])
def test_truncation_anywhere_is_detected(tmp_path, mode):
    data = sample("mixed", 3 * CHUNK + 7, seed=2)
    img, raw, info = make_image(tmp_path, mode, data)
    rnd = random.Random(3)
    cuts = set(range(0, 100)) | set(range(len(raw) - 400, len(raw)))
    cuts |= set(rnd.sample(range(100, len(raw) - 400), 150))
    bad = tmp_path / "bad"
    for cut in sorted(cuts):
        bad.write_bytes(raw[:cut])
        out, err = restore_collect(bad)
        assert isinstance(err, ImageTruncated), f"cut at {cut}: {err!r}"
        assert out == b""  # refused before a single byte is written


@pytest.mark.parametrize("mode", ["raw", "zstd"])
def test_swapped_chunks_are_detected(tmp_path, mode):
    data = sample("random", 4 * CHUNK, seed=9)  # stored chunks: all the same size
    img, raw, info = make_image(tmp_path, mode, data)
    per = info.payload_length // 4
    p = info.payload_offset
    b = bytearray(raw)
    b[p + per : p + 2 * per], b[p + 2 * per : p + 3 * per] = raw[p + 2 * per : p + 3 * per], raw[p + per : p + 2 * per]
    (tmp_path / "bad").write_bytes(b)
    err = check_rejected(tmp_path / "bad", data, ImageCorrupt)
    assert err.chunk == 1


@pytest.mark.parametrize("mode", ["raw", "zstd"])
def test_duplicated_chunk_is_detected(tmp_path, mode):
    data = sample("random", 3 * CHUNK, seed=4)
    img, raw, info = make_image(tmp_path, mode, data)
    per = info.payload_length // 3
    p = info.payload_offset
    b = bytearray(raw)
    b[p + per : p + 2 * per] = raw[p : p + per]
    (tmp_path / "bad").write_bytes(b)
    assert check_rejected(tmp_path / "bad", data, ImageCorrupt).chunk == 1


def test_zeroed_range_is_detected(tmp_path):
    data = sample("mixed", 6 * CHUNK, seed=6)
    img, raw, info = make_image(tmp_path, "auto", data)
    b = bytearray(raw)
    mid = info.payload_offset + info.payload_length // 2
    b[mid : mid + 4096] = bytes(4096)
    (tmp_path / "bad").write_bytes(b)
    check_rejected(tmp_path / "bad", data, ImageCorrupt)


def test_appended_bytes_are_detected(tmp_path):
    data = sample("text", 2 * CHUNK)
    img, raw, info = make_image(tmp_path, "zstd", data)
    (tmp_path / "bad").write_bytes(raw + b"\0" * 10)
    check_rejected(tmp_path / "bad", data, ImageTruncated)


def test_newer_major_version_is_refused(tmp_path):
    data = sample("text", CHUNK)
    img, raw, info = make_image(tmp_path, "zstd", data)
    b = bytearray(raw)
    struct.pack_into("<H", b, len(b) - 16, 3)  # trailer major version: one this reader does not know
    (tmp_path / "bad").write_bytes(b)
    err = check_rejected(tmp_path / "bad", data, UnsupportedImageVersion)
    assert "version" in str(err)


def test_unfinished_libvirt_image_is_refused(tmp_path):
    data = sample("text", CHUNK)
    img, raw, info = make_image(tmp_path, "raw", data)
    (tmp_path / "bad").write_bytes(b"LibvirtQemudPart" + raw[16:])
    err = check_rejected(tmp_path / "bad", data, ImageCorrupt)
    assert "partial" in str(err)


@pytest.mark.parametrize("content", [b"", b"Libvirt", b"hello world" * 1000, bytes(100000)])
def test_not_an_image(tmp_path, content):
    p = tmp_path / "junk"
    p.write_bytes(content)
    expected = ImageTruncated if content in (b"", b"Libvirt") else NotAnImage
    with pytest.raises(expected):
        engine.inspect(p)
    out, err = restore_collect(p)
    assert isinstance(err, expected) and out == b""
