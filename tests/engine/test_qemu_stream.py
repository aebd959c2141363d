"""Checks that the test support code produces sane data and real QEMU streams."""
from __future__ import annotations

import hashlib
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from testkit.mixed import mixed_bytes, mixed_chunks, write_mixed_file
from testkit.qemu_stream import (QEMU, QemuVM, capture_migration_stream,
                                 feed_incoming_stream, load_stream, ram_sha256, save_stream)

needs_qemu = pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} not installed")
FILL_ADDR = 0x1000000


def _zero_page_fraction(data: bytes) -> float:
    zero = bytes(4096)
    pages = len(data) // 4096
    return sum(data[i:i + 4096] == zero for i in range(0, pages * 4096, 4096)) / pages


def test_mixed_bytes_deterministic_and_mixed(tmp_path: Path) -> None:
    a = mixed_bytes(16 << 20, seed=1)
    write_mixed_file(tmp_path / "f", 5 << 20, seed=1)
    assert (tmp_path / "f").read_bytes() == a[:5 << 20]
    assert a == mixed_bytes(16 << 20, seed=1)
    assert a != mixed_bytes(16 << 20, seed=2)
    assert b"".join(mixed_chunks(16 << 20, seed=1, piece=3 << 20)) == a
    assert mixed_bytes(1 << 20, seed=1) == a[:1 << 20]  # prefix-stable
    assert 0.25 <= _zero_page_fraction(a) <= 0.35
    # Between noise (~1.0) and zeros (~0.0): like real guest RAM.
    assert 0.3 <= len(zlib.compress(a, 1)) / len(a) <= 0.8


@pytest.mark.qemu
@needs_qemu
def test_capture_and_reload_stream(tmp_path: Path) -> None:
    fill, stream = tmp_path / "fill.bin", tmp_path / "vm.stream"
    write_mixed_file(fill, 16 << 20)
    fill_hash = hashlib.sha256(fill.read_bytes()).hexdigest()

    with QemuVM(mem_mib=64, fill_path=fill, fill_addr=FILL_ADDR) as src:
        src_fill = ram_sha256(src, 16 << 20, addr=FILL_ADDR)
        src_all = ram_sha256(src, 64 << 20)
        size = save_stream(src, stream)
    assert src_fill == fill_hash
    assert size == stream.stat().st_size
    magic, version = struct.unpack(">II", stream.read_bytes()[:8])
    assert (magic, version) == (0x5145564D, 3)
    # Zero pages cost only a header, so roughly the non-zero fill plus firmware.
    assert 8 << 20 < size < 20 << 20

    with QemuVM(mem_mib=64, incoming=True) as dst:
        info = load_stream(dst, stream)
        assert info["status"] == "completed"
        assert ram_sha256(dst, 16 << 20, addr=FILL_ADDR) == src_fill
        assert ram_sha256(dst, 64 << 20) == src_all


@pytest.mark.qemu
@needs_qemu
def test_capture_function_and_feed(tmp_path: Path) -> None:
    fill, stream = tmp_path / "fill.bin", tmp_path / "vm.stream"
    write_mixed_file(fill, 4 << 20, seed=5)
    size = capture_migration_stream(stream, mem_mib=64, fill_path=fill)
    assert size == stream.stat().st_size > 1 << 20
    status = feed_incoming_stream(stream, mem_mib=64)
    assert status["running"] is False  # -S source arrives as "prelaunch"
    with open(stream, "rb") as f:  # fd input works too
        assert feed_incoming_stream(f.fileno(), mem_mib=64)["running"] is False


@pytest.mark.qemu
@needs_qemu
def test_feed_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.stream"
    bad.write_bytes(mixed_bytes(1 << 20))
    with pytest.raises(RuntimeError, match="migration"):
        feed_incoming_stream(bad, timeout=30)
