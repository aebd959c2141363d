"""Images of several streams (channels): each channel's bytes come back exactly,
in order, on its own output; no channel's progress waits on another's data;
damage within or across channels is refused before a damaged chunk's byte
reaches an output. The layout is read here independently of the C reader."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import zstandard

from conftest import CHUNK, sample
from fastsave import engine
from testkit.xxh3 import xxh3 as load_xxh3
from fastsave._native import ffi, lib
from fastsave.errors import Cancelled, ImageCorrupt, ImageError, ImageTruncated

MODES = ["raw", "zstd", "auto"]
LIMIT = 120.0          # a deadlock fails the test instead of hanging it
TRAILER = 128
GUARD = 4096
SKIPPABLE = 0x184D2A5E


def lengths(n: int) -> list[int]:
    """Channel lengths: the main channel longer than a pipe holds and not a whole number of
    chunks, one channel much longer than the others, some empty."""
    if n == 1:
        return [5 * CHUNK + 17]
    out = [48 * CHUNK + 123, 80 * CHUNK + 5] + [0, 2 * CHUNK, 1, 7 * CHUNK + 999, 0, CHUNK][: n - 2]
    return out


def streams(n: int, seed: int = 1) -> list[bytes]:
    return [sample("mixed", size, seed=seed + c) if size else b"" for c, size in enumerate(lengths(n))]


# ---------------------------------------------------------------- feeding and draining

class Sync:
    """QEMU-like dependencies between channels: the main channel (0) sends its
    head, then waits until every other channel has sent all but its tail; the
    others start only once the head is out, and send their tails only once the
    main channel is done. An engine that read the channels one after the
    other, or that gave a chunk its place in the file before it was complete,
    would never finish."""

    def __init__(self, n: int) -> None:
        self.head_out = threading.Event()
        self.main_done = threading.Event()
        self.bulk_left = n - 1
        self.bulk_done = threading.Event()
        self.lock = threading.Lock()
        if n == 1:
            self.bulk_done.set()

    def bulk_finished(self) -> None:
        with self.lock:
            self.bulk_left -= 1
            if self.bulk_left == 0:
                self.bulk_done.set()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[: 1 << 20]):]


def feed_channels(data: Sequence[bytes], errors: list[BaseException]) -> tuple[list[int], list[threading.Thread]]:
    """Pipes whose read ends carry `data`, written by threads with the
    dependencies of `Sync`. Returns the read ends and the threads."""
    sync = Sync(len(data))
    reads, threads = [], []

    def main(w: int, b: bytes) -> None:
        try:
            head = len(b) // 2 + 7  # ends inside a chunk
            _write_all(w, b[:head])
            sync.head_out.set()
            if not sync.bulk_done.wait(LIMIT):
                raise TimeoutError("the other channels' bulk was never read")
            _write_all(w, b[head:])
        except BaseException as e:  # noqa: BLE001 - handed to the test
            errors.append(e)
        finally:
            sync.head_out.set()
            sync.main_done.set()
            os.close(w)

    def other(w: int, b: bytes) -> None:
        bulk_sent = False
        try:
            if not sync.head_out.wait(LIMIT):
                raise TimeoutError("the main channel's head was never read")
            tail = len(b) - min(len(b), 1000)
            _write_all(w, b[:tail])
            bulk_sent = True
            sync.bulk_finished()
            if not sync.main_done.wait(LIMIT):
                raise TimeoutError("the main channel was never read to its end")
            _write_all(w, b[tail:])
        except BrokenPipeError:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the test
            errors.append(e)
        finally:
            if not bulk_sent:  # failed: do not leave the main channel waiting
                sync.bulk_finished()
            os.close(w)

    for c, b in enumerate(data):
        r, w = os.pipe()
        reads.append(r)
        t = threading.Thread(target=main if c == 0 else other, args=(w, b), daemon=True)
        threads.append(t)
    for t in threads:
        t.start()
    return reads, threads


def save_channels(data: Sequence[bytes], path: Path, **kw) -> engine.Stats:
    errors: list[BaseException] = []
    reads, threads = feed_channels(data, errors)
    job = kw.pop("job", None) or engine.Job()
    watchdog = threading.Timer(LIMIT, job.cancel)
    watchdog.start()
    try:
        stats = engine.save_stream(reads, path, job=job, **kw)
    finally:
        watchdog.cancel()
        for r in reads:
            os.close(r)
        for t in threads:
            t.join(LIMIT)
    assert not job.cancelled, "the save did not finish: channels waited on each other"
    if errors:
        raise errors[0]
    return stats


def restore_channels(image: Path | int, n: int, expect: Sequence[int] | None = None,
                     **kw) -> tuple[list[bytes], BaseException | None]:
    """Restores into one pipe per channel. With `expect` (each channel's
    length), the consumer of channel 0 reads a little, then waits until every
    other channel has delivered all its bytes before it reads on (as QEMU's
    incoming side may wait on its other channels): a restore that wrote the
    channels from one thread in file order would never finish."""
    pipes = [os.pipe() for _ in range(n)]
    got = [bytearray() for _ in range(n)]
    others_done = threading.Event()
    left = [n - 1]
    lock = threading.Lock()
    if n == 1:
        others_done.set()

    def done() -> None:
        with lock:
            left[0] -= 1
            if left[0] == 0:
                others_done.set()

    def drain(c: int, r: int) -> None:
        signalled = c == 0
        if not signalled and expect is not None and expect[c] == 0:
            signalled = True
            done()
        try:
            if c == 0 and expect is not None:
                got[0].extend(os.read(r, 4096))
                others_done.wait(LIMIT)
            while chunk := os.read(r, 1 << 20):
                got[c].extend(chunk)
                if not signalled and expect is not None and len(got[c]) >= expect[c]:
                    signalled = True
                    done()
        finally:
            if not signalled:
                done()

    threads = [threading.Thread(target=drain, args=(c, r), daemon=True) for c, (r, _) in enumerate(pipes)]
    for t in threads:
        t.start()
    job = kw.pop("job", None) or engine.Job()
    watchdog = threading.Timer(LIMIT, job.cancel)
    watchdog.start()
    err: BaseException | None = None
    try:
        engine.restore_stream(image, [w for _, w in pipes], job=job, **kw)
    except Exception as e:  # noqa: BLE001 - returned to the caller
        err = e
    finally:
        watchdog.cancel()
        for _, w in pipes:
            os.close(w)
        for t in threads:
            t.join(LIMIT)
        for r, _ in pipes:
            os.close(r)
    assert not job.cancelled, "the restore did not finish: channels waited on each other"
    return [bytes(g) for g in got], err


# ---------------------------------------------------------------- an independent reader

def parse(raw: bytes) -> dict:
    """The parts of a format 2.x image, read by the layout in docs/image-format.md."""
    tail = raw[-TRAILER:]
    c = tail[8:]
    payload, meta, index, trailer = struct.unpack_from("<4Q", c, 8)
    final_chain, = struct.unpack_from("<Q", c, 48)
    channels, = struct.unpack_from("<I", c, 56)
    major, minor = struct.unpack_from("<HH", c, 104)
    m = raw[meta + 8:index]
    fixed, = struct.unpack_from("<I", m, 12)
    name_len, version_len = struct.unpack_from("<HH", m, 36)
    assert struct.unpack_from("<I", m, 72)[0] == channels
    table = (fixed + name_len + version_len + 7) // 8 * 8
    chans = [struct.unpack_from("<QQ", m, table + 16 * i) for i in range(channels)]
    count, = struct.unpack_from("<Q", raw, index + 16)
    entries, off = [], payload + GUARD
    for i in range(count):
        raw_len, stored, flags, check, chain, channel, reserved = struct.unpack_from(
            "<IIIIQII", raw, index + 24 + 32 * i)
        entries.append(dict(raw_len=raw_len, stored=stored, flags=flags, check=check, chain=chain,
                            channel=channel, reserved=reserved, offset=off))
        off += stored
    assert off == meta
    return dict(major=major, minor=minor, channels=channels, payload=payload, meta=meta,
                index=index, trailer=trailer, final_chain=final_chain, lengths=[l for l, _ in chans],
                chains=[h for _, h in chans], entries=entries, fixed=fixed)


def channel_bytes(raw: bytes, parts: dict, channel: int) -> bytes:
    out = bytearray()
    for e in parts["entries"]:
        if e["channel"] == channel:
            stored = raw[e["offset"]:e["offset"] + e["stored"]]
            if raw[:4] == b"Libv" and struct.unpack_from("<I", raw, 28)[0] == 5:
                stored = zstandard.ZstdDecompressor().decompress(stored, max_output_size=e["raw_len"])
            out += stored
    return bytes(out)


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_round_trip_with_cross_channel_dependencies(tmp_path, mode, n):
    data = streams(n)
    img = tmp_path / "img"
    stats = save_channels(data, img, mode=mode, chunk_size=CHUNK, threads=2)
    assert stats.bytes_in == sum(map(len, data))
    info = engine.inspect(img)
    assert info.channels == n and info.channel_lengths == tuple(map(len, data))
    assert info.stream_length == sum(map(len, data))
    assert info.format_version == ((1, 0) if n == 1 else (2, 0))
    assert info.chunk_count == sum(-(-len(b) // CHUNK) for b in data)
    out, err = restore_channels(img, n, expect=list(map(len, data)))
    assert err is None, err
    assert out == data
    report = engine.verify(img)
    assert report.stats.bytes_out == sum(map(len, data))
    assert sorted(os.listdir(tmp_path)) == ["img"]
    if n > 1:  # an independent reader finds each channel in the file
        raw = img.read_bytes()
        parts = parse(raw)
        assert parts["lengths"] == list(map(len, data))
        for c in range(n):
            assert channel_bytes(raw, parts, c) == data[c]


@pytest.mark.parametrize("direct", [False, True])
def test_round_trip_with_o_direct_and_tight_buffers(tmp_path, direct):
    data = streams(4, seed=9)
    img = tmp_path / "img"
    stats = save_channels(data, img, mode="auto", chunk_size=CHUNK, threads=1, slots=2, direct=direct)
    assert stats.direct == direct
    out, err = restore_channels(img, 4, expect=list(map(len, data)), direct=direct, threads=1, slots=2)
    assert err is None and out == data


def test_one_channel_given_as_a_list_is_the_single_stream_format(tmp_path):
    data = sample("mixed", 3 * CHUNK + 5)
    for name, fds in (("int", None), ("list", True)):
        r, w = os.pipe()
        t = threading.Thread(target=lambda: (_write_all(w, data), os.close(w)))
        t.start()
        engine.save_stream([r] if fds else r, tmp_path / name, mode="zstd", chunk_size=CHUNK)
        os.close(r)
        t.join()
    a, b = (tmp_path / "int").read_bytes(), (tmp_path / "list").read_bytes()
    assert len(a) == len(b)
    for name, raw in (("int", a), ("list", b)):
        info = engine.inspect(tmp_path / name)
        assert info.format_version == (1, 0) and info.channels == 1
        assert struct.unpack_from("<HH", raw, len(raw) - 16) == (1, 0)
        index, trailer = struct.unpack_from("<QQ", raw, len(raw) - TRAILER + 8 + 24)
        assert trailer - index == 8 + 16 + 24 * info.chunk_count + 8  # 24-byte entries
        # the payload decodes as one zstd stream: libvirt's zstd format holds
        payload = raw[info.payload_offset:]
        assert zstandard.ZstdDecompressor().stream_reader(payload, read_across_frames=True).read() == data
    assert engine.restore_stream(tmp_path / "list", [_sink()]).bytes_out == len(data)


def _sink() -> int:
    """A write end whose reader discards everything (closed by the drain thread)."""
    r, w = os.pipe()

    def drain() -> None:
        while os.read(r, 1 << 20):
            pass
        os.close(r)

    threading.Thread(target=drain, daemon=True).start()
    _sinks.append(w)
    return w


_sinks: list[int] = []


@pytest.fixture(autouse=True)
def _close_sinks():
    yield
    while _sinks:
        os.close(_sinks.pop())


@pytest.mark.parametrize("mode,fmt", [("raw", 0), ("zstd", 5)])
def test_libvirt_would_hand_qemu_a_guard_not_a_stream(tmp_path, mode, fmt):
    """Stock libvirt feeds the payload (decoded by zstd for format 5) to QEMU
    as one stream: a multi-channel image starts it with bytes that are not
    QEMU's magic ("QEVM"), so QEMU refuses at once."""
    data = streams(2)
    img = tmp_path / "img"
    save_channels(data, img, mode=mode, chunk_size=CHUNK)
    raw = img.read_bytes()
    assert raw[:16] == b"LibvirtQemudSave" and struct.unpack_from("<II", raw, 16)[0] == 2
    assert struct.unpack_from("<I", raw, 28)[0] == fmt
    info = engine.inspect(img)
    payload = raw[info.payload_offset:]
    first = payload if fmt == 0 else zstandard.ZstdDecompressor().stream_reader(
        payload, read_across_frames=True).read(16)
    assert first[:8] == b"FSV-CHAN" and first[:4] != b"QEVM"
    parts = parse(raw)
    assert parts["major"] == 2  # a 1.x reader refuses it as an unsupported version


# ---------------------------------------------------------------- argument errors

def test_wrong_number_of_outputs_is_refused_before_writing(tmp_path):
    data = streams(3)
    img = tmp_path / "img"
    save_channels(data, img, mode="zstd", chunk_size=CHUNK)
    for n in (1, 2, 4):
        out, err = restore_channels(img, n)
        assert isinstance(err, ValueError), err
        assert "3 channels" in str(err) and f"{n} output" in str(err), str(err)
        assert out == [b""] * n


def test_too_many_channels_are_refused(tmp_path):
    n = lib.FS_CHANNELS_MAX + 1
    with pytest.raises(ValueError, match=f"{n} .*1..{lib.FS_CHANNELS_MAX}"):
        engine.save_stream([0] * n, tmp_path / "img")
    # the C core's own check, before it allocates anything
    opts = ffi.new("struct fs_save_opts *", {"mode": lib.FS_MODE_RAW, "threads": 1, "chunk_size": CHUNK})
    job = ffi.new("struct fs_job *")
    fds = ffi.new("int[]", [0] * n)
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert lib.fs_save_channels(fds, n, dir_fd, b"img", opts, job) < 0
    finally:
        os.close(dir_fd)
    msg = ffi.string(job.error.msg).decode()
    assert job.error.kind == lib.FS_ERR_ARG and str(n) in msg and str(lib.FS_CHANNELS_MAX) in msg, msg
    assert list(tmp_path.iterdir()) == []


def test_channels_whose_restore_would_not_fit_the_buffer_limit_are_refused(tmp_path):
    r, w = os.pipe()
    os.close(w)
    try:
        with pytest.raises(ValueError, match="64 channels with chunk_size 67108864.*1024 MiB"):
            engine.save_stream([r] * 64, tmp_path / "img", mode="zstd", chunk_size=64 << 20, threads=1)
    finally:
        os.close(r)
    assert list(tmp_path.iterdir()) == []


def test_cancel_while_channels_wait(tmp_path):
    pipes = [os.pipe() for _ in range(3)]
    os.write(pipes[1][1], b"x" * 1000)
    job = engine.Job()
    threading.Timer(0.3, job.cancel).start()
    try:
        with pytest.raises(Cancelled):
            engine.save_stream([r for r, _ in pipes], tmp_path / "img", job=job, chunk_size=CHUNK)
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- damage

def forge(raw: bytes, change: Callable[[list[tuple[dict, bytes]]], list[tuple[dict, bytes]]]) -> bytes:
    """The image with its chunks (index entry and stored bytes, in file order)
    changed by `change`, and every length, offset and checksum around them
    made consistent again: only the chain values can tell."""
    xxh3, xxh3_seed = load_xxh3()
    p = parse(raw)
    chunks = [(dict(e), raw[e["offset"]:e["offset"] + e["stored"]]) for e in p["entries"]]
    chunks = change(chunks)
    payload = raw[p["payload"]:p["payload"] + GUARD] + b"".join(d for _, d in chunks)
    lens = [0] * p["channels"]
    seed = 0x6661737473617665
    last = [xxh3_seed(struct.pack("<QQI", (1 << 64) - 1, c, 0), seed) for c in range(p["channels"])]
    image_chain = seed
    entries = b""
    for i, (e, _) in enumerate(chunks):
        lens[e["channel"]] += e["raw_len"]
        last[e["channel"]] = e["chain"]
        image_chain = xxh3_seed(struct.pack("<QQI", i, e["chain"], e["channel"]), image_chain)
        entries += struct.pack("<IIIIQII", e["raw_len"], e["stored"], e["flags"], e["check"], e["chain"],
                               e["channel"], 0)
    m = bytearray(raw[p["meta"]:p["index"]])
    c = 8
    struct.pack_into("<Q", m, c + 40, sum(lens))
    table = c + (p["fixed"] + struct.unpack_from("<H", m, c + 36)[0] + struct.unpack_from("<H", m, c + 38)[0]
                 + 7) // 8 * 8
    for i in range(p["channels"]):
        struct.pack_into("<QQ", m, table + 16 * i, lens[i], last[i])
    struct.pack_into("<Q", m, len(m) - 8, xxh3(m[c:len(m) - 8]))
    head = struct.pack("<II8sQ", SKIPPABLE, 16 + len(entries) + 8, b"FSV-INDX", len(chunks))
    index = head + entries + struct.pack("<Q", xxh3(head[8:] + entries))
    meta_off = p["payload"] + len(payload)
    index_off = meta_off + len(m)
    trailer_off = index_off + len(index)
    tail = bytearray(raw[-TRAILER:])
    struct.pack_into("<4Q", tail, 16, p["payload"], meta_off, index_off, trailer_off)
    struct.pack_into("<Q", tail, 8 + 48, image_chain)
    struct.pack_into("<Q", tail, 8, xxh3(tail[16:]))
    return raw[:p["payload"]] + payload + bytes(m) + index + bytes(tail)


N = 3


@pytest.fixture(params=["raw", "zstd"])
def image(request, tmp_path):
    """Three channels of random data (chunks stored as is: equal-sized full
    chunks that can be swapped), with their bytes."""
    data = [sample("random", 4 * CHUNK + 100, seed=20), sample("random", 3 * CHUNK, seed=21),
            sample("random", 5 * CHUNK + 1, seed=22)]
    img = tmp_path / f"good-{request.param}"
    save_channels(data, img, mode=request.param, chunk_size=CHUNK)
    return img, img.read_bytes(), data


def check_refused(path: Path, data: list[bytes], expected: type[ImageError],
                  bad: dict[int, int] | None = None) -> ImageError:
    """Refused with `expected`; every output a true prefix of its channel, and
    for each channel in `bad`, no byte at or past that stream offset."""
    out, err = restore_channels(path, len(data))
    assert isinstance(err, expected), f"got {err!r}"
    for c, (got, want) in enumerate(zip(out, data)):
        assert want.startswith(got), f"channel {c} received bytes that are not its stream"
        if bad and c in bad:
            assert len(got) <= bad[c], f"channel {c} received bytes of a damaged chunk"
    with pytest.raises(expected):
        engine.verify(path)
    return err


def nth(entries: list[dict], channel: int, k: int) -> int:
    """File position of a channel's k-th chunk."""
    return [i for i, e in enumerate(entries) if e["channel"] == channel][k]


def test_flip_in_a_chunk_is_refused_naming_it(tmp_path, image):
    img, raw, data = image
    p = parse(raw)
    at = nth(p["entries"], 2, 3)
    e = p["entries"][at]
    b = bytearray(raw)
    b[e["offset"] + e["stored"] // 2] ^= 0x10
    (tmp_path / "bad").write_bytes(b)
    err = check_refused(tmp_path / "bad", data, ImageCorrupt, bad={2: 3 * CHUNK})
    assert err.chunk == at and "channel 2" in str(err) and err.offset == e["offset"], str(err)


@pytest.mark.parametrize("how", ["bytes", "coherent"])
def test_two_chunks_of_one_channel_swapped(tmp_path, image, how):
    img, raw, data = image
    p = parse(raw)
    i, j = nth(p["entries"], 0, 1), nth(p["entries"], 0, 2)
    if how == "bytes":  # the stored bytes only
        ei, ej = p["entries"][i], p["entries"][j]
        b = bytearray(raw)
        b[ei["offset"]:ei["offset"] + ei["stored"]] = raw[ej["offset"]:ej["offset"] + ej["stored"]]
        b[ej["offset"]:ej["offset"] + ej["stored"]] = raw[ei["offset"]:ei["offset"] + ei["stored"]]
        bad = bytes(b)
    else:  # entries and bytes moved together, every checksum recomputed
        def swap(chunks):
            chunks[i], chunks[j] = chunks[j], chunks[i]
            return chunks
        bad = forge(raw, swap)
    (tmp_path / "bad").write_bytes(bad)
    check_refused(tmp_path / "bad", data, ImageCorrupt, bad={0: CHUNK})


def test_chunks_swapped_between_channels(tmp_path, image):
    img, raw, data = image
    p = parse(raw)
    i, j = nth(p["entries"], 0, 1), nth(p["entries"], 1, 1)

    def swap(chunks):
        (ei, di), (ej, dj) = chunks[i], chunks[j]
        ei["channel"], ej["channel"] = ej["channel"], ei["channel"]
        chunks[i], chunks[j] = (ej, dj), (ei, di)  # each keeps its place in the other's channel
        return chunks

    (tmp_path / "bad").write_bytes(forge(raw, swap))
    check_refused(tmp_path / "bad", data, ImageCorrupt, bad={0: CHUNK, 1: CHUNK})


def test_dropped_chunk(tmp_path, image):
    img, raw, data = image
    p = parse(raw)
    i = nth(p["entries"], 2, 1)
    (tmp_path / "bad").write_bytes(forge(raw, lambda chunks: chunks[:i] + chunks[i + 1:]))
    check_refused(tmp_path / "bad", [data[0], data[1], data[2][:CHUNK] + data[2][2 * CHUNK:]],
                  ImageCorrupt, bad={2: CHUNK})
    # and the bytes simply cut out, nothing recomputed
    e = p["entries"][i]
    (tmp_path / "cut").write_bytes(raw[:e["offset"]] + raw[e["offset"] + e["stored"]:])
    check_refused(tmp_path / "cut", data, ImageCorrupt)


def test_duplicated_chunk(tmp_path, image):
    img, raw, data = image
    p = parse(raw)
    i = nth(p["entries"], 1, 0)
    (tmp_path / "bad").write_bytes(forge(raw, lambda chunks: chunks[:i + 1] + [chunks[i]] + chunks[i + 1:]))
    check_refused(tmp_path / "bad", [data[0], data[1][:CHUNK] * 2 + data[1][CHUNK:], data[2]],
                  ImageCorrupt, bad={1: CHUNK})


def test_forged_but_unchanged_image_is_accepted(tmp_path, image):
    """The forger itself is right: with no change its image restores."""
    img, raw, data = image
    assert forge(raw, lambda chunks: chunks) == raw
    out, err = restore_channels(img, N, expect=list(map(len, data)))
    assert err is None and out == data


@pytest.mark.parametrize("cut", [1, 100, TRAILER, TRAILER + 40, 5000, 2 * CHUNK])
def test_truncated(tmp_path, image, cut):
    img, raw, data = image
    (tmp_path / "bad").write_bytes(raw[:-cut])
    check_refused(tmp_path / "bad", data, ImageTruncated)


def test_any_byte_flip_is_detected(tmp_path, image):
    img, raw, data = image
    import random
    rnd = random.Random(5)
    info = engine.inspect(img)
    p = parse(raw)
    positions = set(range(0, 92 + len(info.xml) + 1)) | set(range(p["meta"], len(raw)))
    positions |= set(rnd.sample(range(p["payload"], p["meta"]), 120))
    for off in sorted(positions):
        b = bytearray(raw)
        b[off] ^= 1 << rnd.randrange(8)
        (tmp_path / "bad").write_bytes(b)
        out, err = restore_channels(tmp_path / "bad", N)
        assert isinstance(err, (ImageError, ValueError)), f"flip at {off}: {err!r}"
        for got, want in zip(out, data):
            assert want.startswith(got), f"flip at {off} let wrong bytes through"


# ---------------------------------------------------------------- memory

MEASURE = textwrap.dedent("""
    import sys
    from fastsave import engine
    fds = [int(x) for x in sys.argv[3:]]
    engine.save_stream(fds, sys.argv[1], mode=sys.argv[2], chunk_size=1 << 20)
    print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
""")


@pytest.mark.parametrize("mode", ["zstd", "auto"])
def test_memory_does_not_grow_with_the_streams(tmp_path, mode):
    def peak_kib(size_mib: int) -> int:
        gens = [subprocess.Popen(["head", "-c", f"{size_mib if c != 1 else 4 * size_mib}M", "/dev/urandom"],
                                 stdout=subprocess.PIPE) for c in range(4)]
        fds = [g.stdout.fileno() for g in gens]  # type: ignore[union-attr]
        out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "img"), mode, *map(str, fds)],
                             pass_fds=fds, capture_output=True, text=True, check=True).stdout
        for g in gens:
            g.stdout.close()  # type: ignore[union-attr]
            g.wait()
        return int(out.split()[-1])

    # streams long enough to touch every buffer of the pool either way
    small, large = peak_kib(64), peak_kib(256)
    assert large - small < 8 << 10, f"peak RSS grew from {small} KiB to {large} KiB"
    assert large < 160 << 10


# ---------------------------------------------------------------- the child process and the options

def test_engine_process_takes_every_channel(tmp_path):
    from fastsave.worker import EngineProcess

    data = streams(3, seed=30)
    errors: list[BaseException] = []
    reads, threads = feed_channels(data, errors)
    try:
        proc = EngineProcess.save(reads, str(tmp_path / "img"), None,
                                  engine.EngineOptions(mode="zstd", chunk_size=CHUNK, threads=1), name="vm")
    finally:
        for r in reads:
            os.close(r)
    stats = proc.result(timeout=LIMIT)
    for t in threads:
        t.join(LIMIT)
    assert not errors and stats.bytes_in == sum(map(len, data))
    assert engine.inspect(tmp_path / "img").channels == 3

    pipes = [os.pipe() for _ in data]
    got = [bytearray() for _ in data]
    drains = [threading.Thread(target=lambda r=r, g=g: [g.extend(b) for b in iter(lambda: os.read(r, 1 << 20), b"")])
              for (r, _), g in zip(pipes, got)]
    for t in drains:
        t.start()
    fd = os.open(tmp_path / "img", os.O_RDONLY)
    try:
        proc = EngineProcess.restore(fd, [w for _, w in pipes], None, threads=1)
    finally:
        os.close(fd)
        for _, w in pipes:
            os.close(w)
    proc.result(timeout=LIMIT)
    for t in drains:
        t.join(LIMIT)
    for r, _ in pipes:
        os.close(r)
    assert [bytes(g) for g in got] == data


def test_engine_options_are_checked_once_and_serialise():
    opts = engine.EngineOptions(mode="raw", level=3, threads=2, direct=True, chunk_size=CHUNK, slots=5,
                                splice=False)
    assert engine.EngineOptions.from_dict(__import__("json").loads(__import__("json").dumps(opts.to_dict()))) == opts
    assert engine.EngineOptions().mode == "auto"
    for bad, words in [({"mode": "lz4"}, ["lz4", "auto"]), ({"threads": 0}, ["0", "256"]),
                       ({"chunk_size": CHUNK + 1}, ["65537"]), ({"slots": 5000}, ["5000", "4096"])]:
        with pytest.raises(ValueError) as err:
            engine.EngineOptions(**bad)
        assert all(w in str(err.value) for w in words), str(err.value)
    with pytest.raises(ValueError, match="unknown engine options: colour"):
        engine.EngineOptions.from_dict({"colour": 1})
    with pytest.raises(TypeError):
        engine.EngineOptions(direct="yes")  # type: ignore[arg-type]


def test_managed_options_give_engine_options():
    pytest.importorskip("libvirt")
    from fastsave.managed import Options

    o = Options(mode="zstd", level=5, threads=3, chunk_size=2 * CHUNK)
    assert o.engine_options(direct=True) == engine.EngineOptions(
        mode="zstd", level=5, threads=3, direct=True, chunk_size=2 * CHUNK)
    with pytest.raises(ValueError, match="mode"):
        Options(mode="nope").engine_options(direct=False)  # type: ignore[arg-type]
