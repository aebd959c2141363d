"""The system libvirtd for tests/system: started here when it is not running,
restarted to simulate a host boot, and its guests. Only tests/system uses
these (its conftest imports the fixtures): once a process has opened the
embedded driver, libvirt routes qemu:///system to it too, so these tests run
in a pytest process of their own."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import fastsave
from fastsave.connect import EMBED_QEMU_CONF
from fastsave.hook import install_hook
from fastsave.store import default_image_dir
from testkit import fixtures
from testkit.fixtures import _cleanup, _need_host_tools, ensure_qemu_user, make_guest_factory

try:
    import libvirt
except ImportError:
    libvirt = None

SYSTEM_URI = "qemu:///system"
# The same settings as an embedded root's (run QEMU as root, no cgroups or
# namespaces: this host has no systemd and no libvirt-qemu login).
SYSTEM_QEMU_CONF = "# Written by fastsave's test setup.\n" + EMBED_QEMU_CONF


def _daemon_pids(name: str) -> list[int]:
    """Processes called `name` that see the same root directory as this one:
    in a chroot (.ci/other-release), a daemon of the machine outside (or of
    another root) is not ours to use or stop."""
    out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout
    here = os.stat("/")
    pids = []
    for pid in map(int, out.split()):
        try:
            st = os.stat(f"/proc/{pid}/root")
        except OSError:  # gone, or not ours to look at
            continue
        if (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino):
            pids.append(pid)
    return pids


def _daemon_running(name: str) -> bool:
    return bool(_daemon_pids(name))


def _wait_for(pred: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def _can_connect() -> bool:
    try:
        libvirt.open(SYSTEM_URI).close()
        return True
    except libvirt.libvirtError:
        return False


def start_libvirtd() -> None:
    for d in ("/var/log/libvirt/qemu", "/run/libvirt", "/var/lib/libvirt/qemu"):
        os.makedirs(d, exist_ok=True)
    if not _daemon_running("virtlogd"):
        subprocess.run(["virtlogd", "-d"], check=True)
    if not _daemon_running("libvirtd"):
        subprocess.run(["libvirtd", "-d"], check=True)
    _wait_for(_can_connect, "libvirtd did not come up")


def stop_libvirtd() -> None:
    for pid in _daemon_pids("libvirtd"):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    _wait_for(lambda: not _daemon_running("libvirtd"), "libvirtd did not stop")


def restart_libvirtd() -> None:
    """A simulated host boot as far as libvirt is concerned: the daemon starts
    afresh, reloads its config and runs autostart."""
    stop_libvirtd()
    start_libvirtd()


@pytest.fixture(scope="session")
def system_libvirtd() -> Iterator[str]:
    if fixtures._embed_opened:
        pytest.skip("this process has opened the embedded driver, to which libvirt now routes "
                    "qemu:///system too; run these tests in their own process: pytest tests/system")
    if os.geteuid() != 0:
        pytest.skip("the system libvirtd tests need root")
    _need_host_tools()
    if shutil.which("libvirtd") is None:
        pytest.skip("libvirtd is not installed (apt-get install libvirt-daemon-driver-qemu)")
    ensure_qemu_user()
    conf = Path("/etc/libvirt/qemu.conf")
    if not conf.exists() or "fastsave's test setup" not in conf.read_text():
        if conf.exists():
            shutil.copy2(conf, conf.with_suffix(".conf.before-fastsave-tests"))
        conf.write_text(SYSTEM_QEMU_CONF)
    install_hook([default_image_dir("system", {})])
    # libvirtd finds hook scripts when it starts: restart it to be sure ours is seen.
    if _daemon_running("libvirtd"):
        stop_libvirtd()
    start_libvirtd()
    yield SYSTEM_URI


@pytest.fixture
def system_conn(system_libvirtd: str) -> Iterator[object]:
    conn = libvirt.open(system_libvirtd)
    yield conn
    try:
        conn.close()
    except libvirt.libvirtError:
        pass


@pytest.fixture
def make_system_guest(system_conn: object, kernel: str) -> Iterator[Callable[..., object]]:
    created: list = []
    yield make_guest_factory(system_conn, kernel, created)
    try:
        store_dir = fastsave.image_store(system_conn).directory
    except libvirt.libvirtError:  # the test restarted libvirtd under this connection
        store_dir = default_image_dir("system", {})
    _cleanup(created, store_dir, SYSTEM_URI)
