"""pytest fixtures for libvirt tests: an embedded driver root, the system
libvirtd (started here when it is not running), and test guests."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid as _uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import fastsave
from fastsave.connect import EMBED_QEMU_CONF
from fastsave.hook import install_hook
from fastsave.store import default_image_dir

try:
    import libvirt

    from support import guest
except ImportError:  # engine-only test runs; the libvirt fixtures skip
    libvirt = None

SYSTEM_URI = "qemu:///system"
# The same settings as an embedded root's (run QEMU as root, no cgroups or
# namespaces: this host has no systemd and no libvirt-qemu login).
SYSTEM_QEMU_CONF = "# Written by fastsave's test setup.\n" + EMBED_QEMU_CONF


def _need_host_tools() -> None:
    if libvirt is None:
        pytest.skip("libvirt-python is not installed (pip install libvirt-python)")
    missing = [t for t in ("qemu-system-x86_64", "gcc", "ld") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing host tools: {', '.join(missing)} (see .ci/run for the packages)")


def ensure_qemu_user() -> None:
    """libvirt's QEMU driver refuses to start unless this user exists."""
    if subprocess.run(["id", "libvirt-qemu"], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-r", "-M", "-s", "/usr/sbin/nologin", "libvirt-qemu"], check=True)


@pytest.fixture(scope="session")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> str:
    _need_host_tools()
    return guest.build_kernel(tmp_path_factory.mktemp("guest"))


_embed_opened = False


@pytest.fixture(scope="session")
def embed_conn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    global _embed_opened
    _need_host_tools()
    if _system_opened:
        pytest.skip("this process already talks to the system libvirtd; run embedded-driver "
                    "tests in their own pytest process: pytest -m 'not system'")
    _embed_opened = True
    ensure_qemu_user()
    root = tmp_path_factory.mktemp("embed-root")
    os.chmod(root, 0o700)
    conn = fastsave.open_connection(fastsave.prepare_embed_root(root))
    yield conn
    for dom in conn.listAllDomains():
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError:
            pass
    conn.close()


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


_system_opened = False


@pytest.fixture(scope="session")
def system_libvirtd() -> Iterator[str]:
    global _system_opened
    if _embed_opened:
        pytest.skip("this process has opened the embedded driver, to which libvirt now routes "
                    "qemu:///system too; run these tests in their own process: pytest -m system")
    _system_opened = True
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


def make_guest_factory(conn: object, kernel: str, created: list) -> Callable[..., object]:
    def make(mem_mib: int = 128, *, start: bool = True, fill: str | None = None,
             persistent: bool = True) -> object:
        name = f"fs-test-{_uuid.uuid4().hex[:8]}"
        xml = guest.domain_xml(name, kernel, mem_mib, fill=fill)
        dom = conn.defineXML(xml) if persistent else conn.createXML(xml, 0)
        created.append(dom)
        if persistent and start:
            dom.create()
        if start:
            guest.wait_booted(dom)
        return dom
    return make


def _cleanup(created: list, store_dir: str | None, uri: str | None = None) -> None:
    """Destroys and undefines the test's domains and removes their images.
    With `uri`, a connection a test left dead (it restarted libvirtd) is
    replaced by a fresh one, so no guest outlives its test."""
    fresh = None
    for dom in created:
        uuid = dom.UUIDString()  # known locally, even on a dead connection
        if store_dir:  # the image, and what killed controllers leave (locks, marks)
            for p in [Path(store_dir) / f"{uuid}.fsimg", *Path(store_dir).glob(f".{uuid}.*")]:
                p.unlink(missing_ok=True)
        d = dom
        for attempt in (1, 2):
            try:
                if d.isActive():
                    d.destroy()
                if d.isPersistent():
                    d.undefine()
                break
            except libvirt.libvirtError as e:
                if attempt == 2 or uri is None or e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    break
                try:
                    fresh = fresh or libvirt.open(uri)
                    d = fresh.lookupByUUIDString(uuid)
                except libvirt.libvirtError:
                    break
    if fresh is not None:
        fresh.close()


@pytest.fixture
def make_guest(embed_conn: object, kernel: str) -> Iterator[Callable[..., object]]:
    created: list = []
    yield make_guest_factory(embed_conn, kernel, created)
    _cleanup(created, fastsave.image_store(embed_conn).directory)


@pytest.fixture
def make_system_guest(system_conn: object, kernel: str) -> Iterator[Callable[..., object]]:
    created: list = []
    yield make_guest_factory(system_conn, kernel, created)
    try:
        store_dir = fastsave.image_store(system_conn).directory
    except libvirt.libvirtError:  # the test restarted libvirtd under this connection
        store_dir = default_image_dir("system", {})
    _cleanup(created, store_dir, SYSTEM_URI)
