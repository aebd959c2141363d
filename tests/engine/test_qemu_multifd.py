"""QEMU's multi-channel migration with bare QEMU (no libvirt): a save over a
main channel and N multifd channels, each recorded on its own, loads back
into a fresh QEMU with the guest's RAM equal."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from fastsave import channels
from testkit import multifd
from testkit.mixed import write_mixed_file
from testkit.qemu_stream import QEMU, QemuVM, ram_sha256

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} not installed")]
MEM_MIB = 64
FILL_ADDR = 0x1000000


def _need_multifd(vm: QemuVM) -> None:
    if not multifd.supports_multifd(vm):
        pytest.skip(f"{QEMU} has no multifd migration capability")


@pytest.mark.parametrize("n", [2, 4])
def test_multifd_channels_record_and_replay(tmp_path: Path, n: int) -> None:
    fill = tmp_path / "fill.bin"
    write_mixed_file(fill, 32 << 20, seed=n)
    sock_dir = tempfile.mkdtemp(prefix="fs-mfd-")  # 0700, short enough for a socket path
    try:
        with QemuVM(mem_mib=MEM_MIB, fill_path=fill, fill_addr=FILL_ADDR) as src:
            _need_multifd(src)
            before = ram_sha256(src, MEM_MIB << 20)
            rec = multifd.record(src, sock_dir, n, str(tmp_path), intruder=(n == 2))
        assert len(rec.paths) == n + 1
        with open(rec.paths[0], "rb") as f:
            assert int.from_bytes(f.read(4), "big") == channels.MAIN_MAGIC
        for i, p in enumerate(rec.paths[1:]):
            head = Path(p).read_bytes()[:channels.INIT_SIZE]
            assert int.from_bytes(head[:4], "big") == channels.MULTIFD_MAGIC
            assert head[24] == i  # ordered by channel id
        # The pages went over the multifd channels, not the main one.
        assert sum(rec.sizes[1:]) > 16 << 20 > rec.sizes[0]
        if n == 2:
            assert rec.refused == [os.getpid()]  # the foreign connection was closed

        with QemuVM(mem_mib=MEM_MIB, incoming=True) as dst:
            info, _ = multifd.play(dst, sock_dir, rec.paths)
            assert info["status"] == "completed"
            assert ram_sha256(dst, MEM_MIB << 20) == before
            assert dst.qmp.execute("query-status")["status"] in ("paused", "postmigrate", "prelaunch")
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_replay_refuses_a_listener_that_is_not_qemu(tmp_path: Path) -> None:
    """The restore side checks who listens: a socket of another process at
    the path is not fed."""
    sock_dir = tempfile.mkdtemp(prefix="fs-mfd-")
    try:
        path = os.path.join(sock_dir, "in.sock")
        fake = channels.listen(path, 4)
        with pytest.raises(channels.ChannelError, match="not to the domain's QEMU"):
            channels.connect_channels(path, os.getpid() + 1_000_000, 2, timeout=2)
        fake.close()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
