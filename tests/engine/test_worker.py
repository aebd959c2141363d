"""The engine child process: started isolated from the caller's directory and
environment, its job never in argv, its errors raised in the parent with all
their details, and a parent that neither hangs on a bad progress callback nor
waits past a timeout."""
from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import fastsave
from conftest import CHUNK, sample
from fastsave import engine, worker
from fastsave.errors import (
    FastsaveError,
    ImageCorrupt,
    ImageError,
    ImageTruncated,
    NotAnImage,
    UnsupportedImageVersion,
)
from fastsave.worker import EngineProcess
from testkit.engine_io import save_bytes

LIMIT = 30.0  # seconds: no test here may take anywhere near this


def bounded(fn: Callable[[], Any], timeout: float = LIMIT) -> Any:
    """Runs fn in a thread; fails the test (instead of hanging it) if it has
    not returned within timeout. Returns fn's value or raises its exception."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append((True, fn()))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            out.append((False, e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"still blocked after {timeout} s"
    ok, value = out[0]
    if not ok:
        raise value
    return value


def feed(w: int, data: bytes, piece: int = 1 << 20, pause: float = 0.0) -> threading.Thread:
    """Writes data into the pipe's write end in a thread, then closes it."""
    def run() -> None:
        try:
            view = memoryview(data)
            while view:
                n = os.write(w, view[:piece])
                view = view[n:]
                if pause:
                    time.sleep(pause)
        except BrokenPipeError:
            pass
        finally:
            os.close(w)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def engine_save(path: Path, data: bytes, progress: Callable[[engine.Stats], None] | None = None,
                piece: int = 1 << 20, pause: float = 0.0, **kw: Any) -> tuple[EngineProcess, engine.Stats]:
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        e = EngineProcess.save(r, str(path), progress, **kw)
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    t = feed(w, data, piece, pause)
    stats = e.result(timeout=LIMIT)
    t.join(LIMIT)
    return e, stats


def proc_file(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


# ---------------------------------------------------------------- isolation

def _plant(d: Path, names: list[str], markers: Path) -> None:
    d.mkdir()
    for name in names:
        tag = f"{d.name}-{name}"
        (d / f"{name}.py").write_text(
            f"open({str(markers / tag)!r}, 'w').write('imported')\n")


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A working directory and a PYTHONPATH directory full of modules that
    record being imported, and PYTHONSTARTUP pointing at another one; the
    test runs from that directory with that environment."""
    markers = tmp_path / "markers"
    markers.mkdir()
    cwd, pp = tmp_path / "cwd", tmp_path / "pp"
    _plant(cwd, ["json", "fastsave", "ctypes", "dataclasses", "subprocess"], markers)
    _plant(pp, ["json", "fastsave", "sitecustomize", "usercustomize", "ctypes"], markers)
    startup = tmp_path / "startup.py"
    startup.write_text(f"open({str(markers / 'startup')!r}, 'w').write('imported')\n")
    env = {"PYTHONPATH": str(pp), "PYTHONSTARTUP": str(startup), "PYTHONUSERBASE": str(pp),
           "FASTSAVE_SECRET_OF_CALLER": "s3cret"}
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("PYTHONSAFEPATH", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return cwd, pp, markers


def test_planted_modules_would_be_imported_by_a_plain_child(planted):
    """The control: the planted files are live, a child started the way it
    used to be (`python -m fastsave.worker` with the caller's cwd and
    environment) imports them."""
    cwd, pp, markers = planted
    subprocess.run([sys.executable, "-m", "fastsave.worker", "{}"], stdin=subprocess.DEVNULL,
                   capture_output=True, timeout=LIMIT)
    found = {p.name for p in markers.iterdir()}
    assert "cwd-fastsave" in found  # the working directory comes first on sys.path
    assert "pp-sitecustomize" in found  # PYTHONPATH is honoured


def test_child_ignores_callers_directory_and_environment(planted, tmp_path):
    cwd, pp, markers = planted
    data = sample("mixed", 3 * CHUNK + 77)
    e, stats = engine_save(tmp_path / "img", data, mode="zstd", chunk_size=CHUNK, threads=1)
    assert stats.done and stats.bytes_in == len(data)
    assert sorted(p.name for p in markers.iterdir()) == []
    assert engine.inspect(tmp_path / "img").stream_length == len(data)


def test_child_runs_in_root_with_a_minimal_environment(planted, tmp_path):
    r, w = os.pipe2(os.O_CLOEXEC)
    e = EngineProcess.save(r, str(tmp_path / "img"), None, mode="raw")
    os.close(r)
    try:
        pid = e.proc.pid
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        env = dict(kv.split(b"=", 1) for kv in proc_file(pid, "environ").split(b"\0") if kv)
        assert env == {k.encode(): v.encode() for k, v in worker.CHILD_ENV.items()}
        argv = proc_file(pid, "cmdline").split(b"\0")
        assert argv[1] == b"-I"
        assert b"fastsave.worker" in b" ".join(argv)  # how a process list finds it
    finally:
        os.close(w)
    assert bounded(e.result).done


def test_relative_path_is_the_callers(tmp_path, monkeypatch):
    """The child runs in "/": a relative image path still means the caller's."""
    monkeypatch.chdir(tmp_path)
    data = sample("text", CHUNK)
    engine_save(Path("rel-img"), data, mode="raw")
    assert engine.inspect(tmp_path / "rel-img").stream_length == len(data)


def test_child_loads_the_parents_own_package(tmp_path):
    """A parent that imported fastsave from a tree that is not installed (no
    site-packages entry points there) still gets a child running that tree."""
    alt = tmp_path / "alt"
    src = Path(fastsave.__file__).parent
    shutil.copytree(src, alt / "fastsave", ignore=shutil.ignore_patterns("__pycache__"))
    marker = alt / "fastsave" / "imported-by"
    with open(alt / "fastsave" / "__init__.py", "a") as f:
        f.write(f"\nimport os as _os\nopen({str(marker)!r}, 'a').write(f'{{_os.getpid()}}\\n')\n")
    script = (
        "import os, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import fastsave.worker as wk\n"
        "assert wk.__file__.startswith(sys.argv[1]), wk.__file__\n"
        "r, w = os.pipe()\n"
        "e = wk.EngineProcess.save(r, sys.argv[2], None, mode='raw')\n"
        "os.close(r); os.write(w, b'x' * 1000); os.close(w)\n"
        "assert e.result(timeout=30).done\n"
        "print(e.proc.pid)\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", script, str(alt), str(tmp_path / "img")],
                         capture_output=True, text=True, timeout=LIMIT, cwd="/")
    assert out.returncode == 0, out.stderr
    child = out.stdout.strip()
    assert child in marker.read_text().split()
    assert engine.inspect(tmp_path / "img").stream_length == 1000


# ---------------------------------------------------------------- the job

def test_large_xml_goes_over_a_pipe_not_argv(tmp_path):
    secret = "vnc-Pa55w0rd-7f3a"
    xml = (f"<domain><name>big</name><devices><graphics type='vnc' passwd='{secret}'/>"
           + "<!--" + "p" * (1 << 20) + "-->" + "</devices></domain>")
    assert len(xml) > (1 << 20)
    r, w = os.pipe2(os.O_CLOEXEC)
    e = EngineProcess.save(r, str(tmp_path / "img"), None, mode="zstd", xml=xml, name="big",
                           uuid="0f3a2b3c-4d5e-6f70-8192-a3b4c5d6e7f8", was_running=False,
                           threads=1, direct=False)
    os.close(r)
    try:
        assert e.running()  # blocked on the empty pipe
        pid = e.proc.pid
        cmdline = proc_file(pid, "cmdline")
        environ = proc_file(pid, "environ")
        for blob in (cmdline, environ):
            assert secret.encode() not in blob
            assert b"<domain" not in blob and b"ppppppppp" not in blob
        assert len(cmdline) < 4096
    finally:
        t = feed(w, sample("text", 2 * CHUNK))
    stats = bounded(e.result)
    t.join(LIMIT)
    assert stats.done
    info = engine.inspect(tmp_path / "img")
    assert info.xml == xml and info.name == "big" and not info.was_running
    assert str(info.uuid) == "0f3a2b3c-4d5e-6f70-8192-a3b4c5d6e7f8"


# ---------------------------------------------------------------- errors

def _image(tmp_path: Path) -> tuple[Path, bytes, engine.ImageInfo]:
    img = tmp_path / "good"
    save_bytes(sample("random", 4 * CHUNK), img, mode="raw", chunk_size=CHUNK, name="x")
    return img, img.read_bytes(), engine.inspect(img)


def _flip_chunk_2(raw: bytes, info: engine.ImageInfo) -> bytes:
    b = bytearray(raw)
    per = info.payload_length // 4
    b[info.payload_offset + 2 * per + per // 2] ^= 0x40
    return bytes(b)


def _new_major(raw: bytes, info: engine.ImageInfo) -> bytes:
    b = bytearray(raw)
    struct.pack_into("<H", b, len(b) - 16, 3)  # a major this reader does not know
    return bytes(b)


DAMAGE = {
    "corrupt-chunk": (_flip_chunk_2, ImageCorrupt),
    "truncated": (lambda raw, info: raw[: len(raw) - 100], ImageTruncated),
    "new-major": (_new_major, UnsupportedImageVersion),
    "not-an-image": (lambda raw, info: b"hello world" * 1000, NotAnImage),
}


def _restore_in_child(image_fd: int, **kw: Any) -> tuple[bytes, BaseException | None]:
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        e = EngineProcess.restore(image_fd, w, None, **kw)
    finally:
        os.close(w)
    out = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 1 << 20):
            out.extend(chunk)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    err: BaseException | None = None
    try:
        bounded(e.result)
    except Exception as x:  # noqa: BLE001 - returned to the test
        err = x
    t.join(LIMIT)
    os.close(r)
    return bytes(out), err


def _restore_here(path: str, **kw: Any) -> BaseException | None:
    r, w = os.pipe2(os.O_CLOEXEC)
    t = threading.Thread(target=lambda: [None for _ in iter(lambda: os.read(r, 1 << 20), b"")],
                         daemon=True)
    t.start()
    try:
        engine.restore_stream(path, w, **kw)
    except Exception as x:  # noqa: BLE001 - returned to the test
        return x
    finally:
        os.close(w)
        t.join(LIMIT)
        os.close(r)
    return None


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_image_errors_keep_class_and_details(tmp_path, damage):
    img, raw, info = _image(tmp_path)
    make, expected = DAMAGE[damage]
    bad = tmp_path / "bad"
    bad.write_bytes(make(raw, info))
    fd = os.open(bad, os.O_RDONLY | os.O_CLOEXEC)
    try:
        out, err = _restore_in_child(fd, threads=2, direct=False)
        here = _restore_here(f"/proc/self/fd/{fd}", threads=2)
    finally:
        os.close(fd)
    assert type(err) is expected and type(here) is expected
    assert isinstance(err, ImageError)
    assert (str(err), err.path, err.offset, err.chunk) == (str(here), here.path, here.offset, here.chunk)
    assert err.path == f"/proc/self/fd/{fd}"
    if damage == "corrupt-chunk":
        assert err.chunk == 2 and err.offset is not None and err.offset >= info.payload_offset
        assert out == sample("random", 4 * CHUNK)[: 2 * CHUNK]


def test_oserror_from_python_keeps_errno_and_filename(tmp_path):
    missing = tmp_path / "no-such-dir" / "img"
    with pytest.raises(FileNotFoundError) as here:
        save_bytes(b"x", missing)
    with pytest.raises(FileNotFoundError) as ei:
        engine_save(missing, b"x" * 100)
    err = ei.value
    assert err.errno == here.value.errno and err.filename == here.value.filename == str(missing.parent)
    assert str(err) == str(here.value)


def test_oserror_from_the_c_core_keeps_errno_and_filename(tmp_path):
    img, raw, info = _image(tmp_path)
    fd = os.open(img, os.O_RDONLY | os.O_CLOEXEC)
    try:
        r, w = os.pipe2(os.O_CLOEXEC)
        os.close(r)  # nobody reads: the restore's first write fails with EPIPE
        try:
            e = EngineProcess.restore(fd, w, None, threads=1)
            with pytest.raises(OSError) as ei:
                bounded(e.result)
            with pytest.raises(OSError) as here:
                engine.restore_stream(f"/proc/self/fd/{fd}", w, threads=1)
        finally:
            os.close(w)
    finally:
        os.close(fd)
    assert type(ei.value) is type(here.value) is BrokenPipeError
    assert ei.value.errno == errno.EPIPE
    assert ei.value.filename == here.value.filename == f"/proc/self/fd/{fd}"
    assert str(ei.value) == str(here.value)


def test_value_error_and_killed_child(tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        engine_save(tmp_path / "img", b"x", mode="bogus")
    r, w = os.pipe2(os.O_CLOEXEC)
    e = EngineProcess.save(r, str(tmp_path / "img"), None)
    os.close(r)
    try:
        e.kill()
        with pytest.raises(FastsaveError, match="killed by signal SIGKILL"):
            bounded(e.result)
    finally:
        os.close(w)
    assert not e.running()


# ---------------------------------------------------------------- progress

def test_raising_progress_callback_neither_hangs_nor_fails_the_save(tmp_path):
    """A callback that raises once: not called again, its error kept, the
    child's output (far more than a pipe holds) drained, the save done."""
    calls: list[engine.Stats] = []

    def progress(s: engine.Stats) -> None:
        calls.append(s)
        raise RuntimeError("callback bug")

    data = sample("text", 8 << 20)
    e, stats = bounded(lambda: engine_save(
        tmp_path / "img", data, progress, piece=64 << 10, pause=0.004, mode="zstd", threads=1,
        progress_interval=0.001))
    assert stats.done and stats.bytes_in == len(data)
    assert len(calls) == 1
    assert isinstance(e.callback_error, RuntimeError) and str(e.callback_error) == "callback bug"
    assert e.last_stats is not None and e.last_stats.done and e.last_stats.bytes_in == len(data)
    assert stats.wall > 0.5  # output for long enough to fill a 64 KiB pipe many times over
    assert engine.inspect(tmp_path / "img").stream_length == len(data)


def test_last_stats_and_last_advance_for_a_watchdog(tmp_path):
    r, w = os.pipe2(os.O_CLOEXEC)
    t0 = time.monotonic()
    e = EngineProcess.save(r, str(tmp_path / "img"), None, mode="zstd", threads=1,
                           progress_interval=0.02)
    os.close(r)
    try:
        assert t0 <= e.last_advance <= time.monotonic()
        assert e.last_stats is None or e.last_stats.bytes_in == 0
        assert not hasattr(e, "last")

        def wait_for(n: int) -> None:
            deadline = time.monotonic() + LIMIT
            while e.last_stats is None or e.last_stats.bytes_in < n:
                assert time.monotonic() < deadline, "no progress reported"
                time.sleep(0.01)

        os.write(w, bytes(1 << 20))
        wait_for(1 << 20)
        seen = e.last_advance
        assert seen > t0
        before = e.last_stats
        time.sleep(0.5)  # stalled: reports keep coming, counters stand still
        assert e.last_stats is not before
        assert e.last_stats.bytes_in == 1 << 20
        assert e.last_advance == seen
        os.write(w, bytes(1 << 20))
        wait_for(2 << 20)
        assert e.last_advance > seen
    finally:
        os.close(w)
    assert bounded(e.result).bytes_in == 2 << 20


def test_result_timeout_while_the_child_runs(tmp_path):
    r, w = os.pipe2(os.O_CLOEXEC)
    e = EngineProcess.save(r, str(tmp_path / "img"), None)
    os.close(r)
    try:
        t = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            bounded(lambda: e.result(timeout=0.3))
        assert time.monotonic() - t < 5
    finally:
        os.close(w)
    assert bounded(e.result).done


def test_result_timeout_after_the_child_exited(tmp_path):
    """The child is gone but its output is still being handled (a slow
    callback): a timeout still bounds result()."""
    release = threading.Event()
    entered = threading.Event()

    def progress(s: engine.Stats) -> None:
        entered.set()
        release.wait(3 * LIMIT)  # longer than bounded() waits

    r, w = os.pipe2(os.O_CLOEXEC)
    e = EngineProcess.save(r, str(tmp_path / "img"), progress, progress_interval=0.01)
    os.close(r)
    os.write(w, b"y" * 1000)
    os.close(w)
    try:
        assert entered.wait(LIMIT)
        bounded(lambda: e.proc.wait(LIMIT))
        t = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            bounded(lambda: e.result(timeout=0.3))
        assert time.monotonic() - t < 5
    finally:
        release.set()
    stats = bounded(lambda: e.result(timeout=LIMIT))
    assert stats.done and stats.bytes_in == 1000
    assert e.callback_error is None
