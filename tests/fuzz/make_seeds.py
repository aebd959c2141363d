"""Writes seed corpora for the fuzz targets in tests/fuzz/.

    python make_seeds.py OUTDIR [--qemu]

OUTDIR/image/  images saved by fastsave (raw, zstd and auto mode, 64 KiB
               chunks, a few KiB to ~300 KiB, empty stream, XML and names,
               images of several channels), each preceded by the fuzz_image
               control byte (see fuzz_image.c)
OUTDIR/meta/   pieces of those images for fuzz_meta: metadata frames,
               trailers, index frames, a stored raw-block chunk frame

--qemu adds an image of a real QEMU migration stream (16 MiB guest, zstd) when
QEMU is installed; failing that, it is skipped with a note.

Streams are generated from a fixed random seed; only the creation time in
the images changes between runs.
"""
from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import tempfile

from fastsave import engine

CHUNK = 65536
TRAILER = 128
FIX = 0x02       # control byte: recompute checksums after mutation
TWO_THREADS = 0x01

XML = """<domain type='kvm'>
  <name>{name}</name>
  <uuid>6f1c1f38-2d6a-4e0b-9a51-3c1f0a7d2b11</uuid>
  <memory unit='KiB'>{mem}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>
"""


def stream(rng: random.Random, kind: str, size: int) -> bytes:
    if kind == "zero":
        return bytes(size)
    if kind == "random":
        return rng.randbytes(size)
    if kind == "text":
        words = [b"QEMU", b"ram", b"block", b"device", b"0000", b"vmstate", b"\x00\x00\x00\x01"]
        out = bytearray()
        while len(out) < size:
            out += rng.choice(words) + b" "
        return bytes(out[:size])
    # mixed: pages of zeros, text and noise, like guest memory
    out = bytearray()
    while len(out) < size:
        out += stream(rng, rng.choice(["zero", "random", "text", "text"]), 4096)
    return bytes(out[:size])


def save(data: bytes, path: str, tmp: str, **kw) -> bytes:
    src = os.path.join(tmp, "stream")
    with open(src, "wb") as f:
        f.write(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        engine.save_stream(fd, path, chunk_size=CHUNK, threads=1, direct=False, **kw)
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        return f.read()


def save_channels(datas: list[bytes], path: str, tmp: str, **kw) -> bytes:
    """An image of several channels (format 2.x), one stream file each."""
    fds = []
    try:
        for i, data in enumerate(datas):
            src = os.path.join(tmp, f"channel-{i}")
            with open(src, "wb") as f:
                f.write(data)
            fds.append(os.open(src, os.O_RDONLY))
        engine.save_stream(fds, path, chunk_size=CHUNK, threads=1, direct=False, **kw)
    finally:
        for fd in fds:
            os.close(fd)
    with open(path, "rb") as f:
        return f.read()


def pieces(img: bytes) -> dict[str, bytes]:
    """Metadata frame, index frame and trailer of an image, by its trailer."""
    t = img[-TRAILER:]
    payload, meta, index, trailer = struct.unpack_from("<4Q", t, 16)
    out = {"meta": img[meta:index], "index": img[index:trailer], "trailer": t,
           "tail": img[meta:]}
    if index - meta > 0:
        out["meta+trailer"] = img[meta:index] + t
    return out


def capture_qemu(tmp: str) -> bytes | None:
    try:
        from testkit.qemu_stream import capture_migration_stream
        path = os.path.join(tmp, "qemu.stream")
        capture_migration_stream(path, mem_mib=16, timeout=60)
        with open(path, "rb") as f:
            return f.read()
    except Exception as e:  # noqa: BLE001 - the QEMU seed is optional
        print(f"make_seeds: no QEMU seed ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir")
    ap.add_argument("--qemu", action="store_true", help="add an image of a real QEMU migration stream")
    args = ap.parse_args()
    img_dir = os.path.join(args.outdir, "image")
    meta_dir = os.path.join(args.outdir, "meta")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(meta_dir, exist_ok=True)
    rng = random.Random(0x66617374)

    # name, stream kind, size, save options
    cases = [
        ("empty-raw", "zero", 0, dict(mode="raw")),
        ("empty-zstd-xml", "zero", 0, dict(mode="zstd", xml=XML.format(name="empty", mem=65536),
                                           name="empty", uuid="6f1c1f38-2d6a-4e0b-9a51-3c1f0a7d2b11")),
        ("small-raw", "random", 5000, dict(mode="raw")),
        ("small-zstd", "text", 3000, dict(mode="zstd", was_running=False)),
        ("one-chunk-raw-xml", "mixed", CHUNK, dict(mode="raw", xml=XML.format(name="vm-one", mem=1024),
                                                   name="vm-one")),
        ("two-chunks-plus-one-zstd", "mixed", 2 * CHUNK + 1, dict(mode="zstd", name="vm-\u00e9")),
        ("text-zstd", "text", 200 << 10, dict(mode="zstd")),
        ("random-zstd-stored", "random", 100 << 10, dict(mode="zstd")),
        ("mixed-auto", "mixed", 300 << 10, dict(mode="auto")),
        ("mixed-raw", "mixed", 150 << 10, dict(mode="raw", was_running=False)),
        ("zero-zstd-level19", "zero", 256 << 10, dict(mode="zstd", level=19)),
        ("mixed-zstd-fast", "mixed", 190 << 10, dict(mode="zstd", level=-5,
                                                     xml=XML.format(name="fast", mem=2048), name="fast")),
    ]
    count = 0
    with tempfile.TemporaryDirectory(prefix="fastsave-seeds-") as tmp:
        images = []
        for i, (name, kind, size, kw) in enumerate(cases):
            img = save(stream(rng, kind, size), os.path.join(tmp, name + ".img"), tmp, **kw)
            images.append((name, img))
            ctl = FIX | (TWO_THREADS if i % 2 else 0)
            with open(os.path.join(img_dir, name), "wb") as f:
                f.write(bytes([ctl]) + img)
            count += 1
        # several channels (no fix-up: it knows the single-channel index only)
        multi = [
            ("channels-3-zstd", [stream(rng, "mixed", 2 * CHUNK + 9), b"", stream(rng, "text", 70 << 10)],
             dict(mode="zstd", name="vm-multi")),
            ("channels-2-raw", [stream(rng, "random", 5000), stream(rng, "mixed", CHUNK + 1)],
             dict(mode="raw", xml=XML.format(name="vm-multi", mem=4096))),
        ]
        for i, (name, datas, kw) in enumerate(multi):
            img = save_channels(datas, os.path.join(tmp, name + ".img"), tmp, **kw)
            images.append((name, img))
            with open(os.path.join(img_dir, name), "wb") as f:
                f.write(bytes([TWO_THREADS if i % 2 else 0]) + img)
            count += 1
        # a few without fix-up, so the checksum checks themselves stay covered
        for name, img in images[:4]:
            with open(os.path.join(img_dir, name + "-nofix"), "wb") as f:
                f.write(bytes([0]) + img)
            count += 1
        if args.qemu:
            data = capture_qemu(tmp)
            if data is not None:
                img = save(data, os.path.join(tmp, "qemu.img"), tmp, mode="zstd", name="qemu-16m",
                           xml=XML.format(name="qemu-16m", mem=16384))
                if len(img) <= (1 << 20):
                    with open(os.path.join(img_dir, "qemu-16m-zstd"), "wb") as f:
                        f.write(bytes([FIX | TWO_THREADS]) + img)
                    images.append(("qemu-16m-zstd", img))
                    count += 1
                else:
                    print(f"make_seeds: QEMU image is {len(img)} bytes, too big for a seed", file=sys.stderr)

        for name, img in images:
            for part, data in pieces(img).items():
                with open(os.path.join(meta_dir, f"{name}.{part}"), "wb") as f:
                    f.write(data)
                count += 1
        # a stored raw-block chunk frame: the first chunk of the random zstd image
        img = dict(images)["random-zstd-stored"]
        payload = struct.unpack_from("<Q", img[-TRAILER:], 16)[0]
        size = 9 + CHUNK + 3 * ((CHUNK + (128 << 10) - 1) // (128 << 10))
        with open(os.path.join(meta_dir, "stored-frame"), "wb") as f:
            f.write(img[payload:payload + size])
        count += 1
    print(f"make_seeds: {count} seeds in {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
