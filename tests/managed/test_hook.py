"""The libvirt hook, run as libvirtd runs it (a subprocess, the domain XML on
stdin), and the configuration file it shares with the command and library."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid as _uuid
from pathlib import Path

import pytest

from fastsave import config, engine, hook, restore_xml, store
from fastsave.store import ImageStore, UnguardedStore, open_store, require_guarded


class Host:
    """A hook installed against a configuration file and system store of its own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "etc" / "fastsave.conf"
        self.system = root / "system-images"
        self.hooks = root / "hooks" / "qemu.d"
        self.path = Path(hook.install_hook(None, str(self.hooks), config_path=str(self.conf),
                                           system_dir=str(self.system)))

    def store(self, name: str) -> Path:
        with ImageStore(self.root / name) as s:
            return Path(s.directory)

    def listed(self, *stores: Path) -> None:
        self.conf.parent.mkdir(exist_ok=True)
        self.conf.write_text("# stores\n" + "".join(f"store = {s}\n" for s in stores))

    def run(self, xml: str, *args: str, isolated: bool = True) -> subprocess.CompletedProcess[str]:
        # -I -S: no site-packages, so nothing but the standard library can be imported
        cmd = [sys.executable, "-I", "-S", str(self.path)] if isolated else [str(self.path)]
        return subprocess.run([*cmd, *(args or ("dom", "prepare", "begin", "-"))], input=xml,
                              capture_output=True, text=True, timeout=60)


def dom_xml(u: str, name: str = "guest", token: str | None = None) -> str:
    meta = (f'<metadata><fs:restore xmlns:fs="{restore_xml.TOKEN_NS}" token="{token}"/></metadata>'
            if token else "")
    return f"<domain type='kvm'><name>{name}</name><uuid>{u}</uuid>{meta}</domain>"


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def save_image(d: Path, u: str) -> Path:
    p = d / f"{u}.fsimg"
    p.write_bytes(b"saved state")
    return p


def test_install_writes_an_executable_hook_from_the_modules_constants(host):
    text = host.path.read_text()
    assert os.access(host.path, os.X_OK)
    assert repr(restore_xml.TOKEN_NS) in text and repr(store.IMAGE_SUFFIX) in text
    assert repr(config.STORE_MARKER) in text and repr(str(host.conf)) in text
    assert config.parser_source() in text
    assert not [n for n in os.listdir(host.hooks) if n != config.HOOK_NAME]  # no temp file left
    assert (host.system / config.STORE_MARKER).is_file()  # the system store exists, marked
    assert config.load(str(host.conf)).stores == ()  # written for the operator, nothing listed
    assert "store = PATH" in host.conf.read_text()


def test_refuses_a_domain_with_an_image_and_passes_others(host):
    u, other = str(_uuid.uuid4()), str(_uuid.uuid4())
    image = save_image(host.system, u)
    r = host.run(dom_xml(u, "web"))
    assert r.returncode == 1
    assert str(image) in r.stderr and "fastsave start web" in r.stderr and "fastsave remove web" in r.stderr
    assert host.run(dom_xml(u.upper(), "web")).returncode == 1  # UUID spelling does not matter
    assert host.run(dom_xml(other)).returncode == 0
    r = host.run(dom_xml(u, "web"), isolated=False)  # as libvirtd runs it: by its #! line
    assert r.returncode == 1 and "fastsave start web" in r.stderr


def test_fastsaves_own_restore_passes_with_the_current_token(host):
    u = str(_uuid.uuid4())
    save_image(host.system, u)
    with ImageStore(host.system) as s:
        token = s.issue_token(u)
    assert host.run(dom_xml(u, token=token)).returncode == 0
    assert host.run(dom_xml(u, token="0" * 32)).returncode == 1
    with ImageStore(host.system) as s:
        s.revoke_token(u)
    assert host.run(dom_xml(u, token=token)).returncode == 1


def test_only_prepare_begin_is_judged(host):
    u = str(_uuid.uuid4())
    save_image(host.system, u)
    host.conf.parent.mkdir(exist_ok=True)
    host.conf.write_text("garbage\n")
    for args in (("dom", "start", "begin", "-"), ("dom", "release", "end", "-"), ("dom",)):
        assert host.run(dom_xml(u), *args).returncode == 0


def test_store_added_to_the_config_after_install_is_guarded(host):
    u = str(_uuid.uuid4())
    extra = host.store("extra")
    save_image(extra, u)
    assert host.run(dom_xml(u)).returncode == 0  # not listed: not this hook's business
    host.listed(extra)  # no reinstall
    r = host.run(dom_xml(u, "db"))
    assert r.returncode == 1 and str(extra / f"{u}.fsimg") in r.stderr


def test_store_not_mounted_refuses_every_start(host):
    """A listed store without its marker is an empty mount point, or gone:
    what it holds is unknowable, so nothing starts until it is back."""
    mnt = host.root / "mnt"
    mnt.mkdir(mode=0o700)  # the mount point, nothing mounted on it
    host.listed(mnt / "fastsave")
    r = host.run(dom_xml(str(_uuid.uuid4()), "web"))
    assert r.returncode == 1
    assert f"image store {mnt / 'fastsave'} is missing or not mounted" in r.stderr
    assert str(host.conf) in r.stderr and "refusing to start domain dom" in r.stderr  # argv[1]
    (mnt / "fastsave").mkdir(mode=0o700)  # present but without the marker: still unknowable
    assert host.run(dom_xml(str(_uuid.uuid4()))).returncode == 1
    with ImageStore(mnt / "fastsave") as s:  # "mounted": the store with its marker
        s.mark()
    assert host.run(dom_xml(str(_uuid.uuid4()))).returncode == 0


def test_missing_system_store_refuses_every_start(host):
    (host.system / config.STORE_MARKER).unlink()
    r = host.run(dom_xml(str(_uuid.uuid4())))
    assert r.returncode == 1 and "fastsave install-hook" in r.stderr


def test_config_that_cannot_be_read_refuses_every_start(host):
    host.conf.parent.mkdir(exist_ok=True)
    host.conf.write_text("store = relative/path\n")
    r = host.run(dom_xml(str(_uuid.uuid4())))
    assert r.returncode == 1 and str(host.conf) in r.stderr and "absolute path" in r.stderr
    host.conf.write_text("stores = /x\n")
    r = host.run(dom_xml(str(_uuid.uuid4())))
    assert r.returncode == 1 and "unknown setting 'stores'" in r.stderr
    host.conf.write_text("")
    os.chmod(host.conf, 0o666)  # anybody could take a store out of the guard
    r = host.run(dom_xml(str(_uuid.uuid4())))
    assert r.returncode == 1 and "other than root" in r.stderr and "chmod 644" in r.stderr
    with pytest.raises(config.ConfigError, match="other than root"):
        config.load(str(host.conf))
    os.chmod(host.conf, 0o644)
    assert host.run(dom_xml(str(_uuid.uuid4()))).returncode == 0
    if os.geteuid() == 0:
        os.chown(host.conf, 65534, 65534)
        assert host.run(dom_xml(str(_uuid.uuid4()))).returncode == 1
    host.conf.unlink()
    host.conf.mkdir()  # unreadable as a file
    assert host.run(dom_xml(str(_uuid.uuid4()))).returncode == 1
    host.conf.rmdir()  # no file at all: the system store alone
    assert host.run(dom_xml(str(_uuid.uuid4()))).returncode == 0


def test_unreadable_xml_refuses_only_while_something_is_saved(host):
    extra = host.store("extra")
    host.listed(extra)
    for bad in ("<domain", "<domain><uuid>not-a-uuid</uuid></domain>", "<domain/>", ""):
        assert host.run(bad).returncode == 0  # nothing saved anywhere: nothing to lose
    image = save_image(extra, str(_uuid.uuid4()))
    for bad in ("<domain", "<domain><uuid>not-a-uuid</uuid></domain>", "<domain/>", ""):
        r = host.run(bad)
        assert r.returncode == 1 and str(image) in r.stderr, bad


def test_install_lists_and_creates_named_stores_only(tmp_path):
    conf, hooks = tmp_path / "etc" / "fastsave.conf", tmp_path / "qemu.d"
    system, big = tmp_path / "system", tmp_path / "big" / "images"
    gone = tmp_path / "gone" / "images"
    conf.parent.mkdir()
    conf.write_text(f"# mine\nstore = {gone}\n")
    hook.install_hook([str(big)], str(hooks), config_path=str(conf), system_dir=str(system))
    assert config.load(str(conf)).stores == (str(gone), str(big))
    assert conf.read_text().startswith(f"# mine\nstore = {gone}\n")  # kept as it was
    assert (big / config.STORE_MARKER).is_file() and (system / config.STORE_MARKER).is_file()
    assert not gone.exists()  # maybe a mount that is missing: never created behind its back
    assert hook.store_problems(str(conf), str(system)) == [
        f"image store {gone} is missing or not mounted (no {config.STORE_MARKER} in it)"]
    hook.install_hook([str(big)], str(hooks), config_path=str(conf), system_dir=str(system))
    assert config.load(str(conf)).stores == (str(gone), str(big))  # listed once


def test_config_parsing():
    assert config.parse_text("") == {"store": []}
    assert config.parse_text(" # c\n\nstore=/a/b/\nstore = //a/./b\nstore = /c\n") == \
        {"store": ["/a/b", "/c"]}
    for bad in ("store", "store = a", "= /a", "image_dir = /a"):
        with pytest.raises(ValueError, match="line 1"):
            config.parse_text(bad)


def test_config_file_path_is_not_taken_from_the_environment(tmp_path, monkeypatch):
    conf = tmp_path / "c.conf"
    conf.write_text("store = /elsewhere\n")
    monkeypatch.setenv("FASTSAVE_CONFIG", str(conf))
    assert config.load is not None and config.CONFIG_PATH == "/etc/fastsave/fastsave.conf"
    assert config.load(str(conf)).stores == ("/elsewhere",)
    r = subprocess.run([sys.executable, "-c", "from fastsave import config; print(config.CONFIG_PATH)"],
                       capture_output=True, text=True, env={**os.environ, "FASTSAVE_CONFIG": str(conf)})
    assert r.stdout.strip() == "/etc/fastsave/fastsave.conf"


def test_saves_refuse_stores_the_guard_does_not_cover(tmp_path):
    conf, hooks = tmp_path / "fastsave.conf", tmp_path / "qemu.d"
    kw = {"config_path": str(conf), "hook_dir": str(hooks)}
    mine = tmp_path / "mine"
    require_guarded(mine, **kw)  # no hook installed: nothing is guarded, nothing to refuse
    hooks.mkdir()
    (hooks / config.HOOK_NAME).write_text("#!/bin/sh\n")
    with pytest.raises(UnguardedStore, match=f"{mine} is not listed in {conf}.*store = {mine}"):
        open_store("system", {}, str(mine), saving=True, **kw)
    assert not mine.exists()  # refused before the directory was created
    with open_store("system", {}, str(mine), **kw) as s:  # reading (start, list) is fine
        assert s.directory == str(mine)
    with open_store("embed", {"root": str(tmp_path)}, str(mine), saving=True, **kw):
        pass  # no hook runs for embedded drivers: nothing to cover
    require_guarded(config.SYSTEM_DIR, **kw)  # the system store is always covered
    conf.write_text(f"store = {mine}\n")
    with open_store("system", {}, str(mine), saving=True, **kw) as s:
        assert s.directory == str(mine)
    (tmp_path / "via").symlink_to(tmp_path)
    require_guarded(tmp_path / "via" / "mine", **kw)  # the same directory by another path
    conf.write_text("store = mine\n")
    with pytest.raises(UnguardedStore, match=f"{conf}: line 1.*saves are refused"):
        require_guarded(mine, **kw)


# -- images published at libvirt's managed-save path (published.py) -------------
# The hook hands them to fastsave's own check (a python -I child that loads
# the package by its directory); these run it as libvirtd would, with a
# libvirt save directory and definitions directory of the test's own.

class Published:
    """A valid raw image for domain `name`, bound to a definition in
    host.root/qemu (the hook's definitions directory), linked into a save
    directory as published.publish would."""

    def __init__(self, host: Host, tmp: Path, name: str = "web") -> None:
        self.host, self.name, self.uuid = host, name, str(_uuid.uuid4())
        self.binding = restore_xml.new_binding()
        self.save_dir = host.root / "libvirt-save"
        self.save_dir.mkdir(mode=0o700, exist_ok=True)
        self.defs = Path(hook.definitions_dir(str(host.hooks)))
        self.defs.mkdir(exist_ok=True)
        self.define(self.binding)
        stream = tmp / "stream"
        stream.write_bytes(os.urandom(3 << 20))
        xml = restore_xml.clean_for_image(dom_xml(self.uuid, name), self.binding)
        self.image = host.system / f"{self.uuid}.fsimg"
        with open(stream, "rb") as src:
            engine.save_stream(src.fileno(), self.image, mode="raw", xml=xml, name=name,
                               uuid=self.uuid, chunk_size=1 << 20)
        os.chmod(self.image, 0o600)
        with ImageStore(host.system) as s:
            assert s.publish(self.uuid, str(self.save_dir), name + ".save")
        self.link = self.save_dir / f"{name}.save"

    def define(self, binding: str | None) -> None:
        meta = (f"<metadata><s:saved xmlns:s='{restore_xml.BIND_NS}' image='{binding}'/></metadata>"
                if binding else "")
        (self.defs / f"{self.name}.xml").write_text(
            f"<domain type='qemu'><name>{self.name}</name><uuid>{self.uuid}</uuid>{meta}</domain>")

    def start(self, phase: str = "prepare", name: str | None = None):
        # On libvirt's restore path the XML on stdin is the image's own.
        return self.host.run(dom_xml(self.uuid, name or self.name), name or self.name, phase,
                             "begin", "-")

    def orphans(self) -> list[Path]:
        return sorted(self.host.system.glob(f".{self.uuid}.orphaned-*"))


def test_a_published_intact_image_is_left_to_libvirt(host, tmp_path):
    p = Published(host, tmp_path)
    assert p.link.samefile(p.image)
    r = p.start()
    assert r.returncode == 0, r.stderr
    assert p.link.samefile(p.image)  # untouched: libvirt restores it next
    r = p.start("started")  # libvirt restored it: the store lets go, libvirt's link stays
    assert r.returncode == 0 and not p.image.exists() and p.link.exists()
    assert not (host.system / f".{p.uuid}.published").exists()


def test_a_corrupt_published_image_is_refused_and_set_aside(host, tmp_path):
    p = Published(host, tmp_path)
    with open(p.image, "r+b") as f:  # one byte in the middle of the stream
        f.seek(p.image.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    r = p.start()
    assert r.returncode == 1
    assert "refusing to start domain web" in r.stderr and "failed its check" in r.stderr
    assert not p.link.exists() and not p.image.exists(), "libvirt must not find it"
    assert len(p.orphans()) == 1 and str(p.orphans()[0]) in r.stderr
    assert p.start().returncode == 0  # nothing saved any more: the next start boots fresh


def test_a_published_image_of_an_earlier_definition_is_refused(host, tmp_path):
    p = Published(host, tmp_path)
    p.define(None)  # defined again after the save (same name and UUID), without the binding
    r = p.start()
    assert r.returncode == 1 and "current definition" in r.stderr
    assert not p.link.exists() and not p.image.exists() and len(p.orphans()) == 1


def test_libvirt_discarding_the_link_discards_fastsaves_copy(host, tmp_path):
    """virsh start --force-boot / managedsave-remove remove libvirt's file:
    the state is gone for libvirt, so fastsave's copy goes, and the start
    (a fresh boot) goes on."""
    p = Published(host, tmp_path)
    p.link.unlink()
    r = p.start()
    assert r.returncode == 0, r.stderr
    assert not p.image.exists() and not p.orphans()


def test_after_a_rename_plain_starts_are_refused_with_a_pointer(host, tmp_path):
    """libvirt restores no image whose XML names another domain: after a
    rename the state is fastsave start's, and libvirt's link is withdrawn."""
    p = Published(host, tmp_path)
    (p.defs / "web.xml").rename(p.defs / "shop.xml")
    p.name = "shop"
    r = p.start(name="shop")  # libvirt looked for shop.save and found none
    assert r.returncode == 1 and "renamed" in r.stderr and "fastsave start shop" in r.stderr
    assert not p.link.exists() and p.image.exists()
    assert p.start(name="shop").returncode == 1  # unpublished now: the usual pointer


def test_an_unpublished_image_is_still_refused_with_a_pointer(host, tmp_path):
    p = Published(host, tmp_path)
    with ImageStore(host.system) as s:
        s.unpublish(p.uuid)
    assert not p.link.exists() and p.image.exists()
    r = p.start()
    assert r.returncode == 1 and "fastsave start web" in r.stderr
    assert p.image.exists()


def test_the_check_failing_to_run_refuses_the_start(host, tmp_path):
    p = Published(host, tmp_path)
    text = host.path.read_text().replace(f"FASTSAVE_PYTHON = {sys.executable!r}",
                                         "FASTSAVE_PYTHON = '/nonexistent/python3'")
    host.path.write_text(text)
    r = p.start()
    assert r.returncode == 1 and "cannot check" in r.stderr
    assert p.link.samefile(p.image)  # nothing touched
