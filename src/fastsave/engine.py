"""The save-image engine: streams in and out of verified, atomic image files.

Each call runs in C without the GIL. Pass a `Job` to watch its counters or
cancel it from another thread, or a `progress` callback that is called from
a helper thread about every `progress_interval` seconds with a `Stats`.

`restore_stream`, `verify` and `inspect` take the image as a path or as an
open, readable file descriptor (which they read with pread and never close);
`name=` sets what messages and exceptions call the image.

Options beyond the C core's limits (`FS_*_MAX` in csrc/fastsave.h, see
docs/image-format.md) raise ValueError naming the value and the limit.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import threading
import time
import uuid as _uuid
from collections.abc import Callable
from typing import Literal

from ._native import ffi, lib
from .errors import error_from_c

__all__ = [
    "Mode",
    "ImageSource",
    "Stats",
    "ImageInfo",
    "VerifyReport",
    "Job",
    "save_stream",
    "restore_stream",
    "verify",
    "inspect",
    "cleanup",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_LEVEL",
]

Mode = Literal["raw", "zstd", "auto"]
#: An image given as a path or as an open file descriptor.
ImageSource = str | os.PathLike[str] | int
_MODES = {"raw": lib.FS_MODE_RAW, "zstd": lib.FS_MODE_ZSTD, "auto": lib.FS_MODE_AUTO}
DEFAULT_CHUNK_SIZE = 1 << 20
DEFAULT_LEVEL: int = lib.fs_default_level()


@dataclasses.dataclass(frozen=True)
class Stats:
    """Counters of a save or restore (times in seconds)."""

    bytes_in: int
    bytes_out: int
    stream_total: int
    chunks: int
    chunks_compressed: int
    chunks_stored: int
    wall: float
    input_wait: float
    producer_blocked: float
    output_wait: float
    reader_cpu: float
    writer_cpu: float
    worker_cpu: float
    threads: int
    direct: bool
    spliced: bool
    done: bool

    @classmethod
    def _from_c(cls, s: object) -> Stats:
        ns = 1e-9
        return cls(
            bytes_in=s.bytes_in, bytes_out=s.bytes_out, stream_total=s.stream_total,  # type: ignore[attr-defined]
            chunks=s.chunks, chunks_compressed=s.chunks_compressed,  # type: ignore[attr-defined]
            chunks_stored=s.chunks_stored, wall=s.wall_ns * ns,  # type: ignore[attr-defined]
            input_wait=s.input_wait_ns * ns, producer_blocked=s.producer_blocked_ns * ns,  # type: ignore[attr-defined]
            output_wait=s.output_wait_ns * ns, reader_cpu=s.reader_cpu_ns * ns,  # type: ignore[attr-defined]
            writer_cpu=s.writer_cpu_ns * ns, worker_cpu=s.worker_cpu_ns * ns,  # type: ignore[attr-defined]
            threads=s.threads, direct=bool(s.direct), spliced=bool(s.spliced),  # type: ignore[attr-defined]
            done=bool(s.done),  # type: ignore[attr-defined]
        )


class Job:
    """Handle of one engine call: live counters and cancellation.

    A Job serves one call; `stats` may be read from any thread while the
    call runs, and `cancel()` makes the call stop soon with `Cancelled`.
    """

    def __init__(self) -> None:
        self._c = ffi.new("struct fs_job *")
        self._used = False

    def cancel(self) -> None:
        self._c.cancel = 1

    @property
    def cancelled(self) -> bool:
        return bool(self._c.cancel)

    @property
    def stats(self) -> Stats:
        return Stats._from_c(self._c.stats)

    def _take(self) -> object:
        if self._used:
            raise ValueError("a Job serves one call; make a new one")
        self._used = True
        return self._c


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What an image says about itself (after its checks passed).

    `path` is the path the image was opened by, or the name given for an fd.
    """

    path: str
    format_version: tuple[int, int]
    libvirt_format: int
    codec: Literal["raw", "zstd"]
    auto_mode: bool
    level: int
    chunk_size: int
    was_running: bool
    stream_length: int
    chunk_count: int
    chunks_compressed: int
    payload_offset: int
    payload_length: int
    file_size: int
    created: _dt.datetime
    uuid: _uuid.UUID | None
    name: str
    fastsave_version: str
    xml: str


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    info: ImageInfo
    stats: Stats


def _raise(job: object, path: str | None) -> None:
    e = job.error  # type: ignore[attr-defined]
    msg = ffi.string(e.msg).decode("utf-8", "replace")
    raise error_from_c(e.kind, e.err, e.chunk, e.offset, msg, path)


def _run(call: Callable[[object], int], job: Job | None, path: str | None,
         progress: Callable[[Stats], None] | None, interval: float) -> Stats:
    """Runs one C call with its job, progress reporting and error mapping."""
    j = job if job is not None else Job()
    cjob = j._take()
    stop = threading.Event()
    watcher = None
    if progress is not None:
        def watch() -> None:
            while not stop.wait(interval):
                progress(j.stats)
        watcher = threading.Thread(target=watch, name="fastsave-progress", daemon=True)
        watcher.start()
    try:
        rc = call(cjob)
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
    stats = j.stats
    if progress is not None:
        progress(stats)
    if rc < 0:
        _raise(cjob, path)
    return stats


def _default_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, lib.FS_THREADS_MAX))


def _int_in(what: str, value: object, low: int, high: int) -> int:
    """`value` as an int within low..high (C's own checks follow for the finer rules)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{what} {value} out of range {low}..{high}")
    return value


_INT32 = (-(1 << 31), (1 << 31) - 1)


class _Image:
    """An image opened for one call: from a path (closed afterwards) or a caller's fd."""

    def __init__(self, image: ImageSource, name: str | None) -> None:
        if isinstance(image, bool):
            raise TypeError("image must be a path or a file descriptor, not bool")
        if isinstance(image, int):
            if image < 0:
                raise ValueError(f"invalid file descriptor {image}")
            self.fd, self._own = image, False
            self.name = name if name is not None else f"<fd {image}>"
        else:
            path = os.fspath(image)
            self.fd, self._own = os.open(path, os.O_RDONLY | os.O_CLOEXEC), True
            self.name = name if name is not None else path

    def __enter__(self) -> _Image:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._own:
            os.close(self.fd)


def _uuid_bytes(value: str | bytes | _uuid.UUID | None) -> bytes:
    if value is None:
        return bytes(16)
    if isinstance(value, _uuid.UUID):
        return value.bytes
    if isinstance(value, bytes):
        if len(value) != 16:
            raise ValueError("uuid bytes must be 16 long")
        return value
    return _uuid.UUID(value).bytes


def save_stream(
    in_fd: int,
    path: str | os.PathLike[str],
    *,
    mode: Mode = "auto",
    level: int | None = None,
    threads: int | None = None,
    direct: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    xml: str | None = None,
    name: str | None = None,
    uuid: str | bytes | _uuid.UUID | None = None,
    was_running: bool = True,
    splice: bool = True,
    slots: int = 0,
    job: Job | None = None,
    progress: Callable[[Stats], None] | None = None,
    progress_interval: float = 0.5,
) -> Stats:
    """Reads a stream from `in_fd` until EOF and writes the image at `path`.

    The image appears at `path` only once complete and durable; on any
    failure no file is left behind and an exception names the cause.
    `mode`: "raw" (no compression, splice when `in_fd` is a pipe), "zstd"
    (every chunk compressed), "auto" (compress what the CPU allows without
    slowing the producer). `direct`: O_DIRECT writes, where the filesystem
    supports them (`Stats.direct` tells).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {sorted(_MODES)}, not {mode!r}")
    threads = _default_threads() if threads is None else _int_in("threads", threads, 1, lib.FS_THREADS_MAX)
    _int_in("chunk_size", chunk_size, lib.FS_CHUNK_SIZE_MIN, lib.FS_CHUNK_SIZE_MAX)
    _int_in("slots", slots, 0, lib.FS_SLOTS_MAX)
    if level is not None:
        _int_in("level", level, *_INT32)
    target = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(target))
    xml_b = (xml or "").encode()
    name_b = (name or "").encode()
    version_b = _version().encode()
    opts = ffi.new("struct fs_save_opts *")
    opts.mode = _MODES[mode]
    opts.level = DEFAULT_LEVEL if level is None else level
    opts.threads = threads
    opts.direct = 1 if direct else 0
    opts.chunk_size = chunk_size
    opts.slots = slots
    opts.was_running = 1 if was_running else 0
    opts.allow_splice = 1 if splice else 0
    keep = [ffi.from_buffer(xml_b), ffi.from_buffer(name_b), ffi.new("char[]", version_b)]
    opts.xml, opts.xml_len = keep[0], len(xml_b)
    opts.name, opts.name_len = keep[1], len(name_b)
    opts.version = keep[2]
    ffi.memmove(opts.uuid, _uuid_bytes(uuid), 16)
    opts.created_ns = time.time_ns()
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _run(lambda cjob: lib.fs_save(in_fd, dir_fd, base.encode(), opts, cjob),
                    job, target, progress, progress_interval)
    finally:
        os.close(dir_fd)


def restore_stream(
    path: ImageSource,
    out_fd: int,
    *,
    threads: int | None = None,
    direct: bool = False,
    slots: int = 0,
    job: Job | None = None,
    progress: Callable[[Stats], None] | None = None,
    progress_interval: float = 0.5,
    name: str | None = None,
) -> Stats:
    """Checks the image at `path` (a path or an open fd) and writes its stream to `out_fd`.

    Header, metadata, index and trailer are checked before the first byte is
    written; every chunk is checked before it is written, and the first bad
    one stops the restore with `ImageCorrupt`. `name` is what errors call
    the image (default: the path, or "<fd N>").
    """
    with _Image(path, name) as image:
        return _restore(image, out_fd, threads, direct, slots, job, progress, progress_interval)


def _restore(image: _Image, out_fd: int, threads: int | None, direct: bool, slots: int,
             job: Job | None, progress: Callable[[Stats], None] | None,
             interval: float) -> Stats:
    opts = ffi.new("struct fs_restore_opts *")
    opts.threads = (_default_threads() if threads is None
                    else _int_in("threads", threads, 0, lib.FS_THREADS_MAX))
    opts.direct = 1 if direct else 0
    opts.slots = _int_in("slots", slots, 0, lib.FS_SLOTS_MAX)
    return _run(lambda cjob: lib.fs_restore(image.fd, out_fd, opts, cjob), job, image.name,
                progress, interval)


def verify(
    path: ImageSource, *, threads: int | None = None, direct: bool = False,
    job: Job | None = None, name: str | None = None,
) -> VerifyReport:
    """Reads and checks the whole image (a path or an open fd); raises `ImageError` if it is bad."""
    with _Image(path, name) as image:
        info = _inspect(image)
        stats = _restore(image, -1, threads, direct, 0, job, None, 0.5)
    return VerifyReport(info=info, stats=stats)


def inspect(path: ImageSource, *, name: str | None = None) -> ImageInfo:
    """Checks header, metadata, index and trailer, and returns the metadata.

    `path` is a path or an open fd; `ImageInfo.path` is then `name`, by
    default "<fd N>".
    """
    with _Image(path, name) as image:
        return _inspect(image)


def _inspect(image: _Image) -> ImageInfo:
    info = ffi.new("struct fs_image_info *")
    _run(lambda cjob: lib.fs_inspect(image.fd, info, cjob), None, image.name, None, 0.5)
    xml = os.pread(image.fd, info.xml_len, info.xml_offset) if info.xml_len else b""
    raw_uuid = bytes(ffi.buffer(info.uuid, 16))
    return ImageInfo(
        path=image.name,
        format_version=(info.major, info.minor),
        libvirt_format=info.libvirt_format,
        codec="zstd" if info.codec == lib.FS_CODEC_ZSTD else "raw",
        auto_mode=bool(info.auto_mode),
        level=info.level,
        chunk_size=info.chunk_size,
        was_running=bool(info.was_running),
        stream_length=info.stream_len,
        chunk_count=info.chunk_count,
        chunks_compressed=info.chunks_compressed,
        payload_offset=info.payload_offset,
        payload_length=info.payload_len,
        file_size=info.file_size,
        created=_dt.datetime.fromtimestamp(info.created_ns / 1e9, tz=_dt.timezone.utc),
        uuid=None if raw_uuid == bytes(16) else _uuid.UUID(bytes=raw_uuid),
        name=ffi.unpack(info.name, info.name_len).decode("utf-8", "replace"),
        fastsave_version=ffi.string(info.version).decode("utf-8", "replace"),
        xml=xml.decode("utf-8", "replace"),
    )


def cleanup(directory: str | os.PathLike[str]) -> int:
    """Removes temp files of saves that died in `directory`; returns how many."""
    d = os.fspath(directory)
    dir_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        job = ffi.new("struct fs_job *")
        n = lib.fs_cleanup(dir_fd, job)
        if n < 0:
            _raise(job, d)
        return int(n)
    finally:
        os.close(dir_fd)


def _version() -> str:
    from . import __version__
    return __version__
