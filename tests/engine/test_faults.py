"""Failures during a save: full disks, killed processes, cancellation. No final
file may ever be incomplete, and no temp file may outlive a failed save."""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import CHUNK, sample
from fastsave import engine
from fastsave.errors import Cancelled
from testkit.engine_io import restore_bytes, save_bytes

ROOT = os.geteuid() == 0


def big_pipe() -> tuple[int, int]:
    """A pipe that holds 1 MiB, so a test can pre-fill it before the engine reads."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
    return r, w


def _mount(target: Path, *args: str) -> None:
    subprocess.run(["mount", *args, str(target)], check=True, capture_output=True)


@pytest.fixture
def small_tmpfs(tmp_path):
    if not ROOT:
        pytest.skip("mounting a small tmpfs needs root")
    d = tmp_path / "full"
    d.mkdir()
    _mount(d, "-t", "tmpfs", "-o", "size=1m", "tmpfs")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture
def small_ext4(tmp_path):
    """A 16 MiB ext4 filesystem on a loop device: O_DIRECT and ENOSPC together."""
    if not ROOT:
        pytest.skip("a loop-mounted filesystem needs root")
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 missing (apt-get install e2fsprogs)")
    backing = tmp_path / "fs.img"
    with open(backing, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(backing)], check=True, capture_output=True)
    d = tmp_path / "mnt"
    d.mkdir()
    _mount(d, "-o", "loop", str(backing))
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.root
@pytest.mark.parametrize("mode", ["raw", "zstd", "auto"])
@pytest.mark.parametrize("direct", [False, True])
def test_disk_full_tmpfs(small_tmpfs, mode, direct):
    data = sample("random", 4 << 20)  # incompressible, 4x the filesystem
    with pytest.raises(OSError) as ei:
        save_bytes(data, small_tmpfs / "img", mode=mode, direct=direct, chunk_size=CHUNK)
    assert ei.value.errno == errno.ENOSPC
    assert "offset" in str(ei.value) and "img" in str(ei.value)
    assert os.listdir(small_tmpfs) == []


@pytest.mark.root
@pytest.mark.parametrize("mode", ["raw", "zstd", "auto"])
def test_disk_full_ext4_direct_keeps_the_old_image(small_ext4, mode):
    good = sample("text", 1 << 20)
    save_bytes(good, small_ext4 / "img", mode=mode)
    with pytest.raises(OSError) as ei:
        save_bytes(sample("random", 32 << 20), small_ext4 / "img", mode=mode, direct=True)
    assert ei.value.errno == errno.ENOSPC
    assert sorted(p for p in os.listdir(small_ext4) if p != "lost+found") == ["img"]
    assert restore_bytes(small_ext4 / "img") == good  # the earlier image is untouched


SAVER = textwrap.dedent("""
    import sys
    from fastsave import engine
    engine.save_stream(0, sys.argv[1], mode=sys.argv[2], chunk_size=65536)
""")


@pytest.mark.parametrize("mode", ["raw", "zstd", "auto"])
def test_sigkill_mid_stream_leaves_no_image_and_cleanup_removes_temp(tmp_path, mode):
    img = tmp_path / "img"
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(img), mode], stdin=r)
    os.close(r)
    data = sample("random", 8 << 20)
    with os.fdopen(w, "wb") as f:
        f.write(data[: 6 << 20])  # more than the engine stages before its first write
        f.flush()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until data has reached the temp file
            tmps = [p for p in tmp_path.iterdir() if ".fastsave-tmp-" in p.name]
            if tmps and tmps[0].stat().st_size > (1 << 20):
                break
            time.sleep(0.02)
        else:
            pytest.fail("the saver never wrote its temp file")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not img.exists()
    assert len([p for p in tmp_path.iterdir() if ".fastsave-tmp-" in p.name]) == 1
    assert engine.cleanup(tmp_path) == 1
    assert list(tmp_path.iterdir()) == []


def test_cleanup_spares_a_save_in_progress(tmp_path):
    r, w = big_pipe()
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(
        engine.save_stream(r, tmp_path / "img", chunk_size=CHUNK)))
    t.start()
    os.write(w, b"a" * 200000)
    deadline = time.monotonic() + 10
    while not any(".fastsave-tmp-" in p.name for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert engine.cleanup(tmp_path) == 0
    os.write(w, b"b" * 1000)
    os.close(w)
    t.join()
    os.close(r)
    assert restore_bytes(tmp_path / "img") == b"a" * 200000 + b"b" * 1000


def test_cancel_from_another_thread(tmp_path):
    r, w = big_pipe()
    job = engine.Job()
    os.write(w, b"x" * 300000)  # then the producer stalls
    timer = threading.Timer(0.3, job.cancel)
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        engine.save_stream(r, tmp_path / "img", job=job, chunk_size=CHUNK)
    assert time.monotonic() - t0 < 5
    os.close(r)
    os.close(w)
    assert list(tmp_path.iterdir()) == []
    assert job.stats.bytes_in == 300000 and job.stats.done


def test_cancelled_save_keeps_the_previous_image(tmp_path):
    save_bytes(b"old" * 1000, tmp_path / "img")
    r, w = big_pipe()
    job = engine.Job()
    os.write(w, b"new" * 1000)
    threading.Timer(0.2, job.cancel).start()
    with pytest.raises(Cancelled):
        engine.save_stream(r, tmp_path / "img", job=job)
    os.close(r)
    os.close(w)
    assert restore_bytes(tmp_path / "img") == b"old" * 1000
    assert os.listdir(tmp_path) == ["img"]


def test_consumer_gone_during_restore(tmp_path):
    data = sample("mixed", 8 << 20)
    save_bytes(data, tmp_path / "img")
    r, w = os.pipe()
    os.close(r)
    with pytest.raises(BrokenPipeError):
        engine.restore_stream(tmp_path / "img", w)
    os.close(w)


def test_progress_and_live_stats(tmp_path):
    r, w = os.pipe()
    seen: list[engine.Stats] = []

    def produce() -> None:
        for _ in range(6):
            os.write(w, sample("text", 1 << 20))
            time.sleep(0.1)
        os.close(w)

    t = threading.Thread(target=produce)
    t.start()
    final = engine.save_stream(r, tmp_path / "img", progress=seen.append, progress_interval=0.05)
    t.join()
    os.close(r)
    assert len(seen) >= 4
    ins = [s.bytes_in for s in seen]
    assert ins == sorted(ins) and ins[-1] == 6 << 20
    assert len({i for i in ins if 0 < i < 6 << 20}) >= 2  # seen mid-way, more than once
    assert seen[-1] == final and final.done
    assert final.input_wait > 0.2  # the producer's pauses show as waiting for input


@pytest.mark.parametrize("kw,exc", [
    (dict(mode="fast"), ValueError),
    (dict(chunk_size=1000), ValueError),
    (dict(chunk_size=128 << 20), ValueError),
    (dict(threads=0), ValueError),
    (dict(level=99), ValueError),
    (dict(xml="a\0b"), ValueError),
    (dict(uuid="not-a-uuid"), ValueError),
])
def test_bad_arguments(tmp_path, kw, exc):
    with pytest.raises(exc):
        save_bytes(b"data", tmp_path / "img", **kw)
    assert list(tmp_path.iterdir()) == []


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        save_bytes(b"data", tmp_path / "nope" / "img")


def test_job_is_single_use(tmp_path):
    job = engine.Job()
    save_bytes(b"x", tmp_path / "a", job=job)
    with pytest.raises(ValueError):
        save_bytes(b"x", tmp_path / "b", job=job)


MEASURE = textwrap.dedent("""
    import sys
    from fastsave import engine
    engine.save_stream(0, sys.argv[1], mode=sys.argv[2], chunk_size=1 << 20)
    # VmHWM is this program's own peak; ru_maxrss would carry the forking parent's over exec.
    print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
""")


@pytest.mark.parametrize("mode", ["raw", "zstd", "auto"])
def test_memory_does_not_grow_with_the_stream(tmp_path, mode):
    def peak_kib(size_mib: int) -> int:
        gen = subprocess.Popen(["head", "-c", f"{size_mib}M", "/dev/urandom"], stdout=subprocess.PIPE)
        out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "img"), mode],
                             stdin=gen.stdout, capture_output=True, text=True, check=True).stdout
        gen.wait()
        return int(out.split()[-1])

    # Both streams are long enough to have touched every buffer of the ring
    # (auto mode's holds up to 32 chunks, and how many of them a short stream
    # touches depends on the machine's load): what must not happen is growth
    # with the stream's length beyond that.
    small, large = peak_kib(1024), peak_kib(3072)
    assert large - small < 8 << 10, f"peak RSS grew from {small} KiB to {large} KiB"
    assert large < 128 << 10
