"""Shared fixtures: sample streams and a real QEMU migration stream."""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

pytest_plugins = ["testkit.fixtures"]

SYSTEM_DIR = Path(__file__).parent / "system"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """tests/system (the system libvirtd) runs in a pytest process of its own:
    once a process has opened the embedded driver, libvirt routes
    qemu:///system to it too. A run that collected both is refused."""
    system = [i for i in items if SYSTEM_DIR in Path(str(i.path)).parents]
    if system and len(system) != len(items):
        raise pytest.UsageError(
            "tests/system must run in a pytest process of its own: "
            "pytest tests/engine tests/managed; pytest tests/system")


CHUNK = 64 << 10  # small chunks keep the matrix fast while exercising many chunks


def _text(n: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    words = [b"virtual", b"machine", b"memory", b"page", b"qemu", b"libvirt", b"save", b"\n"]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words) + b" "
    return bytes(out[:n])


def sample(kind: str, n: int, seed: int = 1) -> bytes:
    """Deterministic stream contents of one kind."""
    if kind == "zeros":
        return bytes(n)
    if kind == "random":
        return random.Random(seed).randbytes(n)
    if kind == "text":
        return _text(n, seed)
    if kind == "mixed":
        from testkit.mixed import mixed_bytes
        return mixed_bytes(n, seed) if n else b""
    raise ValueError(kind)


@pytest.fixture(scope="session")
def qemu_stream(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real QEMU 7.2 migration stream: 64 MiB guest with 16 MiB of mixed memory."""
    if shutil.which(os.environ.get("FASTSAVE_QEMU", "qemu-system-x86_64")) is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    from testkit.mixed import write_mixed_file
    from testkit.qemu_stream import capture_migration_stream

    d = tmp_path_factory.mktemp("qemu")
    fill = d / "fill.bin"
    write_mixed_file(fill, 16 << 20, seed=7)
    out = d / "stream.bin"
    capture_migration_stream(out, mem_mib=64, fill_path=fill)
    return Path(out).read_bytes()
