"""Byte-exact round trips through the engine, in every mode and I/O path."""
from __future__ import annotations

import os
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CHUNK, sample
from fastsave import engine
from testkit.engine_io import restore_bytes, save_bytes

MODES = ["raw", "zstd", "auto"]
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 17]
KINDS = ["zeros", "random", "text", "mixed"]
IO = [  # (direct, threads)
    pytest.param(False, 1, id="buffered-1t"),
    pytest.param(True, 1, id="direct-1t"),
    pytest.param(False, 3, id="buffered-3t"),
    pytest.param(True, 3, id="direct-3t"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("direct,threads", IO)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", SIZES)
def test_round_trip(tmp_path, mode, direct, threads, kind, size):
    data = sample(kind, size)
    img = tmp_path / "img"
    stats = save_bytes(data, img, mode=mode, direct=direct, threads=threads, chunk_size=CHUNK)
    assert stats.bytes_in == size
    assert stats.direct == direct  # /tmp is a filesystem with O_DIRECT here
    assert restore_bytes(img, direct=direct, threads=threads) == data
    info = engine.verify(img, threads=threads).info
    assert info.stream_length == size
    assert info.chunk_count == -(-size // CHUNK)
    assert sorted(os.listdir(tmp_path)) == ["img"]


@pytest.mark.parametrize("mode", MODES)
def test_round_trip_default_chunk_many_chunks(tmp_path, mode):
    data = sample("mixed", 9 << 20, seed=3)
    img = tmp_path / "img"
    save_bytes(data, img, mode=mode)
    assert restore_bytes(img) == data


def test_raw_uses_splice_from_a_pipe_and_not_with_direct(tmp_path):
    data = sample("random", 3 * CHUNK + 5)
    assert save_bytes(data, tmp_path / "a", mode="raw", chunk_size=CHUNK).spliced
    assert not save_bytes(data, tmp_path / "b", mode="raw", direct=True, chunk_size=CHUNK).spliced
    assert not save_bytes(data, tmp_path / "c", mode="raw", splice=False, chunk_size=CHUNK).spliced
    for name in "abc":
        assert restore_bytes(tmp_path / name) == data
    # Same stream, same layout: the three images are the same but for the creation time.
    assert (tmp_path / "a").stat().st_size == (tmp_path / "b").stat().st_size


def test_save_from_a_socket(tmp_path):
    import socket

    data = sample("mixed", 2 * CHUNK + 99)
    a, b = socket.socketpair()

    def send() -> None:
        with a:
            a.sendall(data)

    t = threading.Thread(target=send)
    t.start()
    with b:
        for mode in ("raw",):
            engine.save_stream(b.fileno(), tmp_path / "img", mode=mode, chunk_size=CHUNK)
    t.join()
    assert restore_bytes(tmp_path / "img") == data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=3 * CHUNK + 300)
    | st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=64), st.integers(1, 4000)),
    mode=st.sampled_from(MODES),
    threads=st.integers(1, 4),
    direct=st.booleans(),
    slots=st.sampled_from([0, 2, 3, 7]),
)
def test_round_trip_property(tmp_path, data, mode, threads, direct, slots):
    img = tmp_path / "prop"
    save_bytes(data, img, mode=mode, threads=threads, direct=direct, slots=slots, chunk_size=CHUNK)
    assert restore_bytes(img, threads=threads, direct=direct, slots=slots) == data


@pytest.mark.qemu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("direct,threads", IO)
def test_round_trip_real_qemu_stream(tmp_path, qemu_stream, mode, direct, threads):
    img = tmp_path / "img"
    stats = save_bytes(qemu_stream, img, mode=mode, direct=direct, threads=threads)
    assert restore_bytes(img, direct=direct, threads=threads) == qemu_stream
    if mode != "raw":
        assert stats.bytes_out < len(qemu_stream)  # guest memory compresses


@pytest.mark.parametrize("slots", [2, 3, 5])
def test_auto_stores_chunks_instead_of_waiting_for_slow_compression(tmp_path, slots):
    # Level 19 compresses far slower than a pipe delivers: auto must not wait for it,
    # and chunks the writer took over while a worker still held them must be exact.
    data = sample("mixed", 12 << 20, seed=8)
    stats = save_bytes(data, tmp_path / "img", mode="auto", level=19, threads=1, slots=slots)
    assert stats.chunks_stored > 0
    assert restore_bytes(tmp_path / "img") == data
    zstd_stats = save_bytes(data, tmp_path / "z", mode="zstd", level=19, threads=1, slots=slots)
    assert zstd_stats.chunks_stored < stats.chunks_stored  # zstd mode waits and compresses all it can
