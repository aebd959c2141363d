"""What the scoreboard compares: libvirt's save modes and formats, its
parallel save, fastsave's modes, and the two limits (QEMU's own stream
without any saver)."""
from __future__ import annotations

import dataclasses
from typing import Any

import libvirt

VIR_DOMAIN_SAVE_BYPASS_CACHE = libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE
VIR_DOMAIN_START_BYPASS_CACHE = libvirt.VIR_DOMAIN_START_BYPASS_CACHE
# virDomainSaveParams / virDomainRestoreParams keys (spelled out for bindings
# older than the libvirt that knows them)
SAVE_PARAM_FILE = getattr(libvirt, "VIR_DOMAIN_SAVE_PARAM_FILE", "file")
SAVE_PARAM_IMAGE_FORMAT = getattr(libvirt, "VIR_DOMAIN_SAVE_PARAM_IMAGE_FORMAT", "image_format")
SAVE_PARAM_PARALLEL_CHANNELS = getattr(libvirt, "VIR_DOMAIN_SAVE_PARAM_PARALLEL_CHANNELS",
                                       "parallel.channels")
# libvirt versions (libvirt.getVersion() numbers) that offer a contender
LIBVIRT_ZSTD = 10_004_000       # save_image_format = "zstd"
LIBVIRT_PARALLEL = 11_002_000   # virDomainSaveParams with image_format "sparse" + parallel.channels
# fastsave's channel counts (QEMU multifd channels; 1 = one migration stream)
CHANNEL_COUNTS = (1, 2, 4)


@dataclasses.dataclass(frozen=True)
class Contender:
    key: str
    label: str
    agent: str          # which embedded root: main, lzop, gzip
    kind: str           # libvirt, libvirt-params, fastsave, producer, consumer
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    min_libvirt: int = 0  # libvirt.getVersion() it needs; left out of the run below that
    needs: str = ""       # what it needs, for the line that says why it was left out


CONTENDERS = [
    Contender("libvirt-raw", "libvirt managedSave", "main", "libvirt",
              {"flags": 0, "start_flags": 0}),
    Contender("fastsave-default", "fastsave auto (default)", "main", "fastsave",
              {"mode": "auto"}),
    # fastsave with a channel count of its own (QEMU's multifd; fastsave's
    # default I/O). The one with fastsave's default count is the default row.
    *[Contender(f"fastsave-auto-ch{n}", f"fastsave auto, {n} ch", "main", "fastsave",
                {"mode": "auto", "channels": n}) for n in CHANNEL_COUNTS],
    Contender("fastsave-auto-direct", "fastsave auto+direct", "main", "fastsave",
              {"mode": "auto", "direct": True}),
    Contender("libvirt-bypass", "libvirt BYPASS_CACHE", "main", "libvirt",
              {"flags": VIR_DOMAIN_SAVE_BYPASS_CACHE, "start_flags": VIR_DOMAIN_START_BYPASS_CACHE}),
    Contender("fastsave-zstd-default", "fastsave zstd", "main", "fastsave",
              {"mode": "zstd"}),
    *[Contender(f"fastsave-zstd-ch{n}", f"fastsave zstd, {n} ch", "main", "fastsave",
                {"mode": "zstd", "channels": n}) for n in CHANNEL_COUNTS],
    Contender("fastsave-zstd-direct", "fastsave zstd+direct", "main", "fastsave",
              {"mode": "zstd", "direct": True}),
    Contender("fastsave-raw-direct", "fastsave raw+direct", "main", "fastsave",
              {"mode": "raw", "direct": True}),
    Contender("fastsave-auto", "fastsave auto (buffered)", "main", "fastsave",
              {"mode": "auto", "direct": False}),
    Contender("fastsave-zstd", "fastsave zstd (buffered)", "main", "fastsave",
              {"mode": "zstd", "direct": False}),
    Contender("fastsave-raw", "fastsave raw (buffered)", "main", "fastsave",
              {"mode": "raw", "direct": False}),
    Contender("limit-producer", "limit: QEMU -> pipe -> /dev/null", "main", "producer"),
    Contender("limit-consumer", "limit: memory -> pipe -> QEMU", "main", "consumer"),
    Contender("libvirt-lzop", "libvirt save_image_format=lzop", "lzop", "libvirt",
              {"flags": 0, "start_flags": 0}),
    Contender("libvirt-gzip", "libvirt save_image_format=gzip", "gzip", "libvirt",
              {"flags": 0, "start_flags": 0}),
    # libvirt >= 11.2: parallel save, only as a plain save to a file in the
    # "sparse" (mapped-ram) format; restored with virDomainRestoreParams
    Contender("libvirt-par2", "libvirt parallel 2 ch (sparse file)", "main", "libvirt-params",
              {"channels": 2, "flags": 0}, LIBVIRT_PARALLEL,
              "libvirt >= 11.2 (virDomainSaveParams with parallel.channels)"),
    Contender("libvirt-par4", "libvirt parallel 4 ch (sparse file)", "main", "libvirt-params",
              {"channels": 4, "flags": 0}, LIBVIRT_PARALLEL,
              "libvirt >= 11.2 (virDomainSaveParams with parallel.channels)"),
    Contender("libvirt-par2-bypass", "libvirt parallel 2 ch + BYPASS_CACHE", "main", "libvirt-params",
              {"channels": 2, "flags": VIR_DOMAIN_SAVE_BYPASS_CACHE}, LIBVIRT_PARALLEL,
              "libvirt >= 11.2 (virDomainSaveParams with parallel.channels)"),
    Contender("libvirt-par4-bypass", "libvirt parallel 4 ch + BYPASS_CACHE", "main", "libvirt-params",
              {"channels": 4, "flags": VIR_DOMAIN_SAVE_BYPASS_CACHE}, LIBVIRT_PARALLEL,
              "libvirt >= 11.2 (virDomainSaveParams with parallel.channels)"),
    # libvirt >= 10.4: zstd as a managed save image format
    Contender("libvirt-zstd", "libvirt save_image_format=zstd", "zstd", "libvirt",
              {"flags": 0, "start_flags": 0}, LIBVIRT_ZSTD, 'libvirt >= 10.4 (save_image_format = "zstd")'),
]
BY_KEY = {c.key: c for c in CONTENDERS}
# gzip on the 4 GiB guest alone would take ~5 min of the ~25 min budget
SKIP = {"mixed-4096": ("libvirt-gzip",)}
DEFAULT = "fastsave-default"
ZSTD_DEFAULT = "fastsave-zstd-default"
BASE = "libvirt-bypass"
RAW = "libvirt-raw"
SAVER_KINDS = ("libvirt", "libvirt-params", "fastsave")
SAVERS = [c.key for c in CONTENDERS if c.kind in SAVER_KINDS]


def fastsave_channels() -> tuple[int | None, str | None]:
    """fastsave's default channel count (None: chosen per save) and, when
    this fastsave has no `channels` option, why channel contenders cannot run."""
    import fastsave.managed

    fields = {f.name: f for f in dataclasses.fields(fastsave.managed.Options)}
    if "channels" not in fields:
        return 1, "this fastsave has no channels option (fastsave.managed.Options)"
    d = fields["channels"].default
    if d is None and hasattr(fastsave.channels, "auto_count"):
        # chosen per save from the CPUs: what a save on this machine gets
        from fastsave.engine import usable_cpus
        return fastsave.channels.auto_count(usable_cpus()), None
    return (d if isinstance(d, int) and d > 0 else None), None


def default_channels_of(c: Contender, default: int | None) -> int | None:
    """The channel count a fastsave contender saves with (None: fastsave's
    own choice at run time)."""
    return c.params.get("channels", default) if c.kind == "fastsave" else None


def available(libvirt_version: int, only: list[str] | None = None
              ) -> tuple[list[Contender], dict[str, str], dict[str, Any]]:
    """The contenders to run (of `only`, if given), why each other one this
    stack cannot run is left out, and what fastsave offers:
    {"default_channels": N or None, "channels_missing": reason or None,
    "same_as": {key: the default row it would repeat}}."""
    def ver(v: int) -> str:
        return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"

    default, missing = fastsave_channels()
    left: dict[str, str] = {}
    same: dict[str, str] = {}
    for c in CONTENDERS:
        if libvirt_version < c.min_libvirt:
            left[c.key] = f"needs {c.needs}; this is libvirt {ver(libvirt_version)}"
        elif c.kind == "fastsave" and "channels" in c.params:
            n = c.params["channels"]
            dflt = DEFAULT if c.params["mode"] == "auto" else ZSTD_DEFAULT
            if n == default:  # the same call as the default row: run once, as the default
                same[c.key] = dflt
            elif missing:
                left[c.key] = missing
    if only:  # a channel row asked for that is the default's: the default row runs
        only = [*only, *(same[k] for k in only if k in same)]
    run = [c for c in CONTENDERS if c.key not in left and c.key not in same
           and (not only or c.key in only)]
    if only:
        left = {k: v for k, v in left.items() if k in only}
    return run, left, {"default_channels": default, "channels_missing": missing, "same_as": same}
