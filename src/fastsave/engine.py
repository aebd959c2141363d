"""The save-image engine: streams in and out of verified, atomic image files.

Each call runs in C without the GIL. Pass a `Job` to watch its counters or
cancel it from another thread, or a `progress` callback that is called from
a helper thread about every `progress_interval` seconds with a `Stats`.

`restore_stream`, `verify` and `inspect` take the image as a path or as an
open, readable file descriptor (which they read with pread and never close);
`name=` sets what messages and exceptions call the image.

A save may take several input streams (channels, e.g. QEMU's main and
multifd channels) and a restore gives each back on its own output; each
channel's bytes come back exactly, in order. `EngineOptions` is the one
serialisable shape of the engine's settings.

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from ._native import ffi, lib
from .errors import error_from_c

__all__ = [
    "Mode",
    "EngineOptions",
    "usable_cpus",
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
    "CHANNELS_MAX",
]

Mode = Literal["raw", "zstd", "auto"]
#: An image given as a path or as an open file descriptor.
ImageSource = str | os.PathLike[str] | int
_MODES = {"raw": lib.FS_MODE_RAW, "zstd": lib.FS_MODE_ZSTD, "auto": lib.FS_MODE_AUTO}
DEFAULT_CHUNK_SIZE = 1 << 20
DEFAULT_LEVEL: int = lib.fs_default_level()
CHANNELS_MAX: int = lib.FS_CHANNELS_MAX


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
    #: streams in the image (1 for a single-stream, format 1.x image)
    channels: int = 1
    #: stream length of each channel
    channel_lengths: tuple[int, ...] = ()


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


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity), within the engine's
    thread limit: the default number of engine threads."""
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


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How the engine saves (and, for threads, direct and slots, restores).

    Checked once, here: a bad value raises ValueError (TypeError for a wrong
    type) naming the value and the limit. `to_dict()`/`from_dict()` give the
    JSON form the engine's child process receives.

    mode: "raw" (no compression, splice when the input is one pipe), "zstd"
        (every chunk compressed), "auto" (compress what the CPU allows without
        slowing the producer).
    level: zstd level (None: DEFAULT_LEVEL).
    threads: compression workers (None: `usable_cpus()` where the call runs).
    direct: O_DIRECT image I/O where the filesystem supports it.
    chunk_size: bytes per chunk, a multiple of 4096 from 64 KiB to 64 MiB.
    slots: chunk buffers in flight (0: the engine's default).
    splice: raw mode may move a single pipe's data with splice.
    """

    mode: Mode = "auto"
    level: int | None = None
    threads: int | None = None
    direct: bool = False
    chunk_size: int = DEFAULT_CHUNK_SIZE
    slots: int = 0
    splice: bool = True

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}, not {self.mode!r}")
        if self.threads is not None:
            _int_in("threads", self.threads, 1, lib.FS_THREADS_MAX)
        _int_in("chunk_size", self.chunk_size, lib.FS_CHUNK_SIZE_MIN, lib.FS_CHUNK_SIZE_MAX)
        if self.chunk_size % 4096:
            raise ValueError(f"chunk_size {self.chunk_size} out of range: a multiple of 4096 from "
                             f"{lib.FS_CHUNK_SIZE_MIN} to {lib.FS_CHUNK_SIZE_MAX}")
        _int_in("slots", self.slots, 0, lib.FS_SLOTS_MAX)
        if self.level is not None:
            _int_in("level", self.level, *_INT32)
        for what in ("direct", "splice"):
            if not isinstance(getattr(self, what), bool):
                raise TypeError(f"{what} must be a bool, not {type(getattr(self, what)).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineOptions:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown engine options: {', '.join(sorted(unknown))}")
        return cls(**data)

    def with_overrides(self, **kw: Any) -> EngineOptions:
        """These options with some fields replaced (checked again)."""
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown engine options: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **kw) if kw else self


def _fds(fds: int | Sequence[int], what: str) -> list[int]:
    """One fd or a sequence of them (one per channel), as a list."""
    items = [fds] if isinstance(fds, int) and not isinstance(fds, bool) else list(fds)  # type: ignore[arg-type]
    for fd in items:
        if isinstance(fd, bool) or not isinstance(fd, int):
            raise TypeError(f"{what} must be file descriptors (ints), not {type(fd).__name__}")
        if fd < 0:
            raise ValueError(f"invalid file descriptor {fd} in {what}")
    if not 1 <= len(items) <= lib.FS_CHANNELS_MAX:
        raise ValueError(f"{len(items)} {what}: channels out of range 1..{lib.FS_CHANNELS_MAX}")
    return items


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
    in_fds: int | Sequence[int],
    path: str | os.PathLike[str],
    options: EngineOptions | None = None,
    *,
    xml: str | None = None,
    name: str | None = None,
    uuid: str | bytes | _uuid.UUID | None = None,
    was_running: bool = True,
    job: Job | None = None,
    progress: Callable[[Stats], None] | None = None,
    progress_interval: float = 0.5,
    **engine_kw: Any,
) -> Stats:
    """Reads streams until EOF and writes the image at `path`.

    `in_fds`: one fd, or one per channel (at most CHANNELS_MAX; channel 0
    first). Every channel is read as fast as it delivers, whatever the others
    do. One channel writes a format 1.x image, several a format 2.x image.
    The image appears at `path` only once complete and durable; on any
    failure no file is left behind and an exception names the cause.
    `options` (default `EngineOptions()`); its fields may also be given as
    keywords (mode=, level=, threads=, direct=, chunk_size=, slots=, splice=),
    which override them. `Stats.direct` tells whether O_DIRECT was used.
    """
    opts_py = (options or EngineOptions()).with_overrides(**engine_kw)
    fds = _fds(in_fds, "input fds")
    target = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(target))
    xml_b = (xml or "").encode()
    name_b = (name or "").encode()
    version_b = _version().encode()
    opts = ffi.new("struct fs_save_opts *")
    opts.mode = _MODES[opts_py.mode]
    opts.level = DEFAULT_LEVEL if opts_py.level is None else opts_py.level
    opts.threads = usable_cpus() if opts_py.threads is None else opts_py.threads
    opts.direct = 1 if opts_py.direct else 0
    opts.chunk_size = opts_py.chunk_size
    opts.slots = opts_py.slots
    opts.was_running = 1 if was_running else 0
    opts.allow_splice = 1 if opts_py.splice else 0
    keep = [ffi.from_buffer(xml_b), ffi.from_buffer(name_b), ffi.new("char[]", version_b)]
    opts.xml, opts.xml_len = keep[0], len(xml_b)
    opts.name, opts.name_len = keep[1], len(name_b)
    opts.version = keep[2]
    ffi.memmove(opts.uuid, _uuid_bytes(uuid), 16)
    opts.created_ns = time.time_ns()
    c_fds = ffi.new("int[]", fds)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _run(lambda cjob: lib.fs_save_channels(c_fds, len(fds), dir_fd, base.encode(), opts, cjob),
                    job, target, progress, progress_interval)
    finally:
        os.close(dir_fd)


def restore_stream(
    path: ImageSource,
    out_fds: int | Sequence[int],
    options: EngineOptions | None = None,
    *,
    threads: int | None = None,
    direct: bool | None = None,
    slots: int | None = None,
    job: Job | None = None,
    progress: Callable[[Stats], None] | None = None,
    progress_interval: float = 0.5,
    name: str | None = None,
) -> Stats:
    """Checks the image at `path` (a path or an open fd) and writes its streams.

    `out_fds`: one fd per channel of the image (channel 0 first); a wrong
    count raises ValueError before anything is written. Each channel is
    written by its own thread, so a consumer may read them in any order.
    Header, metadata, index and trailer are checked before the first byte is
    written; every chunk is checked before it is written, and the first bad
    one stops the restore with `ImageCorrupt`. `threads`, `direct` and
    `slots` default to those of `options` (threads: `usable_cpus()`;
    restore accepts 0, meaning 1; slots are per channel). `name` is what
    errors call the image (default: the path, or "<fd N>").
    """
    fds = _fds(out_fds, "output fds")
    base = options or EngineOptions()
    threads = base.threads if threads is None else threads
    direct = base.direct if direct is None else direct
    slots = base.slots if slots is None else slots
    with _Image(path, name) as image:
        return _restore(image, fds, threads, direct, slots, job, progress, progress_interval)


def _restore(image: _Image, out_fds: list[int] | None, threads: int | None, direct: bool, slots: int,
             job: Job | None, progress: Callable[[Stats], None] | None,
             interval: float) -> Stats:
    opts = ffi.new("struct fs_restore_opts *")
    opts.threads = (usable_cpus() if threads is None
                    else _int_in("threads", threads, 0, lib.FS_THREADS_MAX))
    opts.direct = 1 if direct else 0
    opts.slots = _int_in("slots", slots, 0, lib.FS_SLOTS_MAX)
    if out_fds is None:
        return _run(lambda cjob: lib.fs_restore_channels(image.fd, ffi.NULL, 0, opts, cjob), job,
                    image.name, progress, interval)
    c_fds = ffi.new("int[]", out_fds)
    return _run(lambda cjob: lib.fs_restore_channels(image.fd, c_fds, len(out_fds), opts, cjob), job,
                image.name, progress, interval)


def verify(
    path: ImageSource, *, threads: int | None = None, direct: bool = False,
    job: Job | None = None, name: str | None = None,
) -> VerifyReport:
    """Reads and checks the whole image (a path or an open fd); raises `ImageError` if it is bad."""
    with _Image(path, name) as image:
        info = _inspect(image)
        stats = _restore(image, None, threads, direct, 0, job, None, 0.5)
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
        channels=info.channels,
        channel_lengths=tuple(info.channel_len[c] for c in range(info.channels)),
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
