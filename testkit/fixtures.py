"""pytest fixtures for libvirt tests: an embedded driver root and test guests.
The system libvirtd's fixtures are in testkit/system_daemon.py (tests/system)."""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid as _uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import fastsave

try:
    import libvirt

    from testkit import guest
except ImportError:  # engine-only test runs; the libvirt fixtures skip
    libvirt = None


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
                    d.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
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
