"""The image layout, checked with independent readers: libvirt's header rules,
python-zstandard, the zstd command line tool."""
from __future__ import annotations

import io
import shutil
import struct
import subprocess
import uuid

import pytest
import zstandard

from conftest import CHUNK, sample
from fastsave import engine
from testkit.engine_io import save_bytes

SKIPPABLE = 0x184D2A5E


def libvirt_header(raw: bytes) -> dict[str, object]:
    magic = raw[:16]
    version, data_len, was_running, fmt, cookie = struct.unpack_from("<5I", raw, 16)
    unused = struct.unpack_from("<14I", raw, 36)
    return dict(magic=magic, version=version, data_len=data_len, was_running=was_running,
                format=fmt, cookie=cookie, unused=unused)


@pytest.mark.parametrize("mode,fmt", [("raw", 0), ("zstd", 5), ("auto", 5)])
@pytest.mark.parametrize("was_running", [True, False])
def test_libvirt_header(tmp_path, mode, fmt, was_running):
    xml = "<domain type='qemu'><name>vm-1</name></domain>"
    save_bytes(sample("text", 1000), tmp_path / "img", mode=mode, xml=xml, was_running=was_running,
               chunk_size=CHUNK)
    raw = (tmp_path / "img").read_bytes()
    h = libvirt_header(raw)
    assert h["magic"] == b"LibvirtQemudSave"
    assert h["version"] == 2
    assert h["format"] == fmt
    assert h["was_running"] == int(was_running)
    assert h["cookie"] == 0 and h["unused"] == (0,) * 14
    region = raw[92 : 92 + h["data_len"]]
    assert region.split(b"\0", 1)[0] == xml.encode()
    assert (92 + h["data_len"]) % 4096 == 0  # the stream starts block-aligned


def test_raw_payload_is_the_stream_then_fastsave_frames(tmp_path, qemu_stream):
    save_bytes(qemu_stream, tmp_path / "img", mode="raw")
    raw = (tmp_path / "img").read_bytes()
    start = 92 + libvirt_header(raw)["data_len"]
    assert raw[start : start + len(qemu_stream)] == qemu_stream
    rest = raw[start + len(qemu_stream) :]
    # Everything after the stream is a chain of skippable frames; QEMU stops at its EOS marker.
    pos = 0
    while pos < len(rest):
        magic, size = struct.unpack_from("<II", rest, pos)
        assert magic == SKIPPABLE
        pos += 8 + size
    assert pos == len(rest) and rest.endswith(b"FSV-TAIL")


@pytest.mark.parametrize("mode", ["zstd", "auto"])
def test_zstd_payload_decodes_with_python_zstandard(tmp_path, mode, qemu_stream):
    data = qemu_stream + sample("random", 3 * CHUNK)  # random chunks are stored, not compressed
    save_bytes(data, tmp_path / "img", mode=mode)
    info = engine.inspect(tmp_path / "img")
    payload = (tmp_path / "img").read_bytes()[info.payload_offset :]
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload), read_across_frames=True)
    assert reader.read() == data


@pytest.mark.parametrize("mode", ["zstd", "auto"])
def test_zstd_payload_decodes_with_the_zstd_cli(tmp_path, mode, qemu_stream):
    zstd = shutil.which("zstd")
    assert zstd, "the zstd command line tool is part of the test requirements (apt-get install zstd)"
    data = qemu_stream + sample("random", 2 * CHUNK)
    save_bytes(data, tmp_path / "img", mode=mode)
    info = engine.inspect(tmp_path / "img")
    with open(tmp_path / "img", "rb") as f:
        f.seek(info.payload_offset)
        out = subprocess.run([zstd, "-dc"], stdin=f, capture_output=True, check=True).stdout
    assert out == data


def test_empty_stream_zstd_payload_decodes_to_nothing(tmp_path):
    save_bytes(b"", tmp_path / "img", mode="zstd")
    info = engine.inspect(tmp_path / "img")
    payload = (tmp_path / "img").read_bytes()[info.payload_offset :]
    out = subprocess.run(["zstd", "-dc"], input=payload, capture_output=True, check=True).stdout
    assert out == b""


def test_inspect_reports_metadata(tmp_path):
    u = uuid.uuid4()
    xml = "<domain><name>db-01</name></domain>"
    data = sample("mixed", 3 * CHUNK + 1)
    save_bytes(data, tmp_path / "img", mode="auto", level=3, xml=xml, name="db-01", uuid=u,
               was_running=False, chunk_size=CHUNK)
    info = engine.inspect(tmp_path / "img")
    assert info.name == "db-01" and info.uuid == u and info.xml == xml
    assert info.codec == "zstd" and info.auto_mode and info.level == 3
    assert info.chunk_size == CHUNK and info.chunk_count == 4
    assert info.stream_length == len(data)
    assert not info.was_running
    assert info.format_version == (1, 0)
    assert info.fastsave_version
    assert info.file_size == (tmp_path / "img").stat().st_size
    assert abs(info.created.timestamp() - __import__("time").time()) < 60


def test_default_save_needs_no_keywords(tmp_path):
    data = sample("text", 5000)
    r, w = __import__("os").pipe()
    with open(w, "wb") as f:
        f.write(data)
    engine.save_stream(r, tmp_path / "img")
    __import__("os").close(r)
    info = engine.inspect(tmp_path / "img")
    assert info.name == "" and info.uuid is None and info.xml == ""
    assert info.codec == "zstd" and info.auto_mode  # the default mode is auto


def test_image_files_are_private(tmp_path):
    save_bytes(b"x" * 100, tmp_path / "img", mode="raw")
    assert (tmp_path / "img").stat().st_mode & 0o777 == 0o600
