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
    Contender("fastsave-auto-direct", "fastsave auto+direct", "main", "fastsave",
              {"mode": "auto", "direct": True}),
    Contender("libvirt-bypass", "libvirt BYPASS_CACHE", "main", "libvirt",
              {"flags": VIR_DOMAIN_SAVE_BYPASS_CACHE, "start_flags": VIR_DOMAIN_START_BYPASS_CACHE}),
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
BASE = "libvirt-bypass"
RAW = "libvirt-raw"
SAVER_KINDS = ("libvirt", "libvirt-params", "fastsave")
SAVERS = [c.key for c in CONTENDERS if c.kind in SAVER_KINDS]


def available(libvirt_version: int) -> tuple[list[Contender], dict[str, str]]:
    """The contenders this libvirt can run, and why each other one is left out."""
    def ver(v: int) -> str:
        return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"

    run = [c for c in CONTENDERS if libvirt_version >= c.min_libvirt]
    left = {c.key: f"needs {c.needs}; this is libvirt {ver(libvirt_version)}"
            for c in CONTENDERS if libvirt_version < c.min_libvirt}
    return run, left
