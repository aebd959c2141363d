"""virsh parity on the embedded driver: the XML kept in a saved state
(virDomainManagedSaveGetXMLDesc / virDomainManagedSaveDefineXML, `fastsave
dumpxml` / `define` / `edit`) and `fastsave list`, with real QEMU guests."""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
from pathlib import Path

import libvirt
import pytest

import fastsave
import fastsave.connect
from fastsave import channels, cli, engine, restore_xml
from fastsave.store import ImageStore
from testkit import guest

pytestmark = pytest.mark.qemu

SECURE = libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE
SAVE_RUNNING = libvirt.VIR_DOMAIN_SAVE_RUNNING
SAVE_PAUSED = libvirt.VIR_DOMAIN_SAVE_PAUSED
START_PAUSED = libvirt.VIR_DOMAIN_START_PAUSED
VNC = "<graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1' passwd='s3cretpw'/>"


def image_path(dom) -> Path:
    return Path(fastsave.image_store(dom.connect()).image_path(dom.UUIDString()))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code(excinfo) -> int:
    return excinfo.value.get_error_code()


def with_on_crash(xml: str, value: str) -> str:
    new, n = re.subn(r"<on_crash>[^<]*</on_crash>", f"<on_crash>{value}</on_crash>", xml)
    assert n == 1
    return new


def saved_paused(make_guest, mem: int = 64):
    """A guest saved while paused, with the snapshot of its RAM at the save."""
    dom = make_guest(mem)
    dom.suspend()
    ram = guest.ram_sha256(dom, mem)
    fastsave.managed_save(dom)
    return dom, ram


_READ_ONLY: dict[str, object] = {}


@pytest.fixture
def run_cli(embed_conn, monkeypatch, capsys):
    """The command in this process (an embedded root belongs to one process),
    returning (exit code, stdout, stderr)."""
    monkeypatch.setattr(cli, "_stop_on_signals", lambda: None)
    uri = embed_conn.getURI()

    def connection(u: str, readonly: bool = False):
        # each open of an embedded root registers a driver in libvirt's fixed
        # table: the command shares this process's connections
        assert u == uri
        if not readonly:
            return embed_conn
        if "ro" not in _READ_ONLY:
            _READ_ONLY["ro"] = libvirt.openReadOnly(uri)
        return _READ_ONLY["ro"]
    monkeypatch.setattr(fastsave.connect, "open_connection", connection)

    def run(*args: str, uri_first: bool = True) -> tuple[int, str, str]:
        argv = ["--uri", uri, *args] if uri_first else [*args, "--uri", uri]
        try:
            rc = cli.main(argv)
        except SystemExit as e:
            rc = int(e.code or 0)
        out, err = capsys.readouterr()
        return rc, out, err
    return run


# -- virDomainManagedSaveGetXMLDesc ---------------------------------------------

def test_get_xml_desc_secure_keeps_secrets_plain_strips_them(make_guest, embed_conn):
    dom = make_guest(64, start=False)
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    dom = embed_conn.defineXML(xml.replace("</devices>", VNC + "</devices>"))
    dom.create()
    guest.wait_booted(dom)
    # libvirt's own formatter drops the password without the secure flag
    assert "s3cretpw" not in dom.XMLDesc(0) and "s3cretpw" in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
    fastsave.managed_save(dom)
    secure = fastsave.managed_save_get_xml_desc(dom, SECURE)
    plain = fastsave.managed_save_get_xml_desc(dom)
    assert "passwd='s3cretpw'" in secure or 'passwd="s3cretpw"' in secure
    assert "s3cretpw" not in plain and "<graphics" in plain
    assert dom.UUIDString() in plain and f"<name>{dom.name()}</name>" in plain
    assert libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE == libvirt.VIR_DOMAIN_XML_SECURE


def test_get_xml_desc_read_only_connection_denied_secure_form(make_guest, embed_conn):
    dom, _ = saved_paused(make_guest)
    try:
        ro = libvirt.openReadOnly(embed_conn.getURI())
    except libvirt.libvirtError as e:
        pytest.skip(f"no read-only connection to the embedded driver here: {e}")
    try:
        rdom = ro.lookupByUUIDString(dom.UUIDString())
        with pytest.raises(libvirt.libvirtError) as ei:
            fastsave.managed_save_get_xml_desc(rdom, SECURE)
        assert code(ei) == libvirt.VIR_ERR_OPERATION_DENIED and "secure" in str(ei.value)
        assert dom.UUIDString() in fastsave.managed_save_get_xml_desc(rdom)
        with pytest.raises(libvirt.libvirtError) as ei:
            fastsave.managed_save_define_xml(rdom, fastsave.managed_save_get_xml_desc(dom, SECURE))
        assert code(ei) == libvirt.VIR_ERR_OPERATION_DENIED
    finally:
        ro.close()


def test_no_saved_state_is_libvirts_error(make_guest):
    dom = make_guest(64)  # running: no saved state
    for call in (lambda: fastsave.managed_save_get_xml_desc(dom),
                 lambda: fastsave.managed_save_define_xml(dom, dom.XMLDesc(0))):
        with pytest.raises(libvirt.libvirtError) as ei:
            call()
        assert code(ei) == libvirt.VIR_ERR_OPERATION_INVALID
        assert "domain does not have managed save image" in str(ei.value)
    dom.destroy()  # shut off, no image
    with pytest.raises(libvirt.libvirtError) as ei:
        fastsave.managed_save_get_xml_desc(dom)
    assert code(ei) == libvirt.VIR_ERR_OPERATION_INVALID
    with pytest.raises(libvirt.libvirtError) as ei:
        fastsave.managed_save_get_xml_desc(dom, 0x100)
    assert code(ei) == libvirt.VIR_ERR_INVALID_ARG


# -- virDomainManagedSaveDefineXML ----------------------------------------------

def test_define_round_trip_takes_effect_and_running_flag_is_honoured(make_guest):
    mem = 64
    dom, ram = saved_paused(make_guest, mem)
    old = image_path(dom)
    assert engine.inspect(old).was_running is False
    xml = with_on_crash(fastsave.managed_save_get_xml_desc(dom, SECURE), "preserve")
    assert fastsave.managed_save_define_xml(dom, xml, SAVE_RUNNING) == 0
    info = engine.inspect(old)
    assert info.was_running is True and "<on_crash>preserve</on_crash>" in info.xml
    assert stat.S_IMODE(os.stat(old).st_mode) == 0o600
    assert "<on_crash>preserve</on_crash>" in fastsave.managed_save_get_xml_desc(dom)
    assert restore_xml.image_binding(info.xml) == restore_xml.definition_binding(dom)
    assert fastsave.has_managed_save_image(dom) == 1
    # the persistent definition is not changed, as with libvirt
    assert "<on_crash>destroy</on_crash>" in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    fastsave.start(dom, START_PAUSED)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    assert guest.ram_sha256(dom, mem) == ram
    assert "<on_crash>preserve</on_crash>" in dom.XMLDesc(0)  # the defined XML took effect
    dom.resume()
    guest.wait_booted(dom)


def test_define_paused_flag_brings_a_running_save_back_paused(make_guest):
    dom = make_guest(64)
    fastsave.managed_save(dom)  # saved running
    assert engine.inspect(image_path(dom)).was_running is True
    with pytest.raises(libvirt.libvirtError) as ei:
        fastsave.managed_save_define_xml(dom, fastsave.managed_save_get_xml_desc(dom, SECURE),
                                         SAVE_RUNNING | SAVE_PAUSED)
    assert code(ei) == libvirt.VIR_ERR_INVALID_ARG
    fastsave.managed_save_define_xml(dom, fastsave.managed_save_get_xml_desc(dom, SECURE), SAVE_PAUSED)
    assert engine.inspect(image_path(dom)).was_running is False
    fastsave.start(dom)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    dom.resume()


def test_define_abi_change_refused_image_intact(make_guest):
    dom, ram = saved_paused(make_guest)
    before = digest(image_path(dom))
    xml = fastsave.managed_save_get_xml_desc(dom, SECURE)
    bigger = re.sub(r"<vcpu([^>]*)>1</vcpu>", r"<vcpu\1>2</vcpu>", xml)
    assert bigger != xml
    with pytest.raises(libvirt.libvirtError) as ei:
        fastsave.managed_save_define_xml(dom, bigger)
    assert code(ei) == libvirt.VIR_ERR_CONFIG_UNSUPPORTED, ei.value
    with pytest.raises(libvirt.libvirtError):
        fastsave.managed_save_define_xml(dom, "<domain><name>broken")
    assert digest(image_path(dom)) == before
    fastsave.start(dom, START_PAUSED)
    assert guest.ram_sha256(dom, 64) == ram


def test_define_failing_before_the_commit_leaves_the_old_image(make_guest, monkeypatch):
    dom, ram = saved_paused(make_guest)
    path = image_path(dom)
    before = digest(path)
    binding_meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, restore_xml.BIND_NS,
                                libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    seen = {}

    def broken_commit(self, uuid):
        seen["pending"] = Path(self.pending_path(uuid)).stat().st_size  # fully written
        raise OSError(5, "injected failure before the rename")

    monkeypatch.setattr(ImageStore, "commit_pending", broken_commit)
    xml = with_on_crash(fastsave.managed_save_get_xml_desc(dom, SECURE), "preserve")
    with pytest.raises(OSError):
        fastsave.managed_save_define_xml(dom, xml, SAVE_RUNNING)
    monkeypatch.undo()
    assert seen["pending"] > 0
    assert digest(path) == before
    assert not list(path.parent.glob(f".{dom.UUIDString()}.pending"))
    assert dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, restore_xml.BIND_NS,
                        libvirt.VIR_DOMAIN_AFFECT_CONFIG) == binding_meta
    fastsave.start(dom)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED  # saved paused, the define did not happen
    assert guest.ram_sha256(dom, 64) == ram
    assert "<on_crash>destroy</on_crash>" in dom.XMLDesc(0)


def test_define_killed_after_pending_written_next_call_drops_it(make_guest, monkeypatch):
    """A process dying after the new image is written but before the rename
    leaves a pending file and the old image: the next call drops the pending."""
    dom, _ = saved_paused(make_guest)
    path = image_path(dom)
    before = digest(path)

    class Killed(BaseException):
        pass

    def die(self, uuid):
        raise Killed()

    monkeypatch.setattr(ImageStore, "commit_pending", die)
    monkeypatch.setattr(ImageStore, "discard_pending", lambda self, uuid: None)  # died: no cleanup
    with pytest.raises(Killed):
        fastsave.managed_save_define_xml(
            dom, with_on_crash(fastsave.managed_save_get_xml_desc(dom, SECURE), "preserve"))
    monkeypatch.undo()
    pending = path.parent / f".{dom.UUIDString()}.pending"
    assert pending.exists() and digest(path) == before
    assert fastsave.has_managed_save_image(dom) == 1
    assert not pending.exists()
    fastsave.start(dom)
    assert "<on_crash>destroy</on_crash>" in dom.XMLDesc(0)


# -- the command -----------------------------------------------------------------

def test_cli_options_after_the_verb_and_domain_by_id_uuid(make_guest, run_cli):
    dom = make_guest(64)
    rc, out, _ = run_cli("list", "--json")
    rows = {r["uuid"]: r for r in json.loads(out)}
    assert rc == 0 and rows[dom.UUIDString()]["state"] == "running"
    assert rows[dom.UUIDString()]["id"] == dom.ID()
    rc, out, _ = run_cli("--json", "has", str(dom.ID()))
    assert rc == 0 and json.loads(out)["image"] is False
    rc, out, err = run_cli("save", str(dom.ID()), "--json", "--mode", "raw", "--verbose",
                           uri_first=False)
    assert rc == 0 and json.loads(out)["saved"] is True
    assert err.splitlines()[-1] == "Managed save: [100.00 %]"  # as `virsh save --verbose`
    rc, out, _ = run_cli("has", dom.UUIDString(), "--json")
    assert rc == 0 and json.loads(out)["image"] is True
    rc, _, err = run_cli("has", "424242")
    assert rc == 1 and "Domain not found" in err


def test_cli_list_filters_and_saved_state(make_guest, run_cli):
    running = make_guest(64)
    saved = make_guest(64)
    off = make_guest(64, start=False)
    fastsave.managed_save(saved)
    names = {d.name() for d in (running, saved, off)}

    def listed(*args: str) -> set[str]:
        rc, out, _ = run_cli("list", "--name", *args)
        assert rc == 0
        return {ln for ln in out.split() if ln in names}

    assert listed() == {running.name()}
    assert listed("--all") == names
    assert listed("--inactive") == {saved.name(), off.name()}
    assert listed("--all", "--with-managed-save") == {saved.name()}
    assert listed("--all", "--without-managed-save") == {running.name(), off.name()}
    rc, out, _ = run_cli("list", "--all", "--uuid")
    assert {running.UUIDString(), saved.UUIDString(), off.UUIDString()} <= set(out.split())
    rc, out, _ = run_cli("list", "--all")
    lines = out.splitlines()
    assert re.match(r"^\s*Id\s+Name\s+State\s*$", lines[0])
    state_of = {ln.split()[1]: " ".join(ln.split()[2:]) for ln in lines[2:] if ln.strip()}
    assert state_of[saved.name()] == "saved" and state_of[off.name()] == "shut off"
    assert state_of[running.name()] == "running"
    rc, out, _ = run_cli("list", "--all", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows[saved.name()]["state"] == "saved" and rows[saved.name()]["managed_save"] is True
    assert rows[saved.name()]["id"] is None and rows[saved.name()]["image"]["bytes"] > 0
    assert rows[off.name()]["managed_save"] is False and rows[off.name()]["state"] == "shut off"
    rc, out, _ = run_cli("list", "--images", "--json")
    imgs = {r["uuid"]: r for r in json.loads(out)}
    assert imgs[saved.UUIDString()]["name"] == saved.name() and imgs[saved.UUIDString()]["ok"]


def test_cli_dumpxml_define_edit(make_guest, run_cli, tmp_path, monkeypatch):
    dom, ram = saved_paused(make_guest)
    name = dom.name()
    rc, out, _ = run_cli("dumpxml", name, "--security-info")
    assert rc == 0 and f"<name>{name}</name>" in out
    f = tmp_path / "new.xml"
    f.write_text(with_on_crash(out, "restart"))
    rc, out, err = run_cli("define", name, str(f), "--running")
    assert rc == 0, err
    assert "<on_crash>restart</on_crash>" in fastsave.managed_save_get_xml_desc(dom)
    assert engine.inspect(image_path(dom)).was_running is True
    # edit: the editor comes from the caller's environment, as with virsh
    editor = tmp_path / "editor.py"
    editor.write_text("import re, sys\np = sys.argv[1]\nt = open(p).read()\n"
                      "open(p, 'w').write(re.sub(r'<on_crash>[^<]*</on_crash>', "
                      "'<on_crash>preserve</on_crash>', t))\n")
    monkeypatch.setenv("EDITOR", f"{sys.executable} {editor}")
    monkeypatch.delenv("VISUAL", raising=False)
    rc, out, err = run_cli("edit", name, "--paused")
    assert rc == 0, err
    assert "<on_crash>preserve</on_crash>" in fastsave.managed_save_get_xml_desc(dom)
    assert engine.inspect(image_path(dom)).was_running is False
    monkeypatch.setenv("EDITOR", "true")
    before = digest(image_path(dom))
    rc, out, _ = run_cli("edit", name)
    assert rc == 0 and "not changed" in out and digest(image_path(dom)) == before
    fastsave.start(dom)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED and guest.ram_sha256(dom, 64) == ram
    assert "<on_crash>preserve</on_crash>" in dom.XMLDesc(0)


def test_cli_save_verbose_shows_progress(make_guest, run_cli, tmp_path):
    fill = tmp_path / "fill.bin"
    fill.write_bytes(os.urandom(384 << 20))  # incompressible: the save takes a while
    dom = make_guest(512, fill=str(fill))
    # zstd level 9 on random data: the engine holds QEMU back for seconds
    rc, _, err = run_cli("save", dom.name(), "--verbose", "--mode", "zstd", "--level", "9")
    assert rc == 0, err
    shown = [float(m) for m in re.findall(r"^Managed save: \[\s*([\d.]+) %\]$", err, re.M)]
    assert shown[-1] == 100.0 and shown == sorted(shown)
    assert any(0 < p < 100 for p in shown), err  # progress while QEMU streamed


def test_cli_channels_option(make_guest, run_cli):
    dom = make_guest(128)
    rc, _, err = run_cli("save", dom.name(), "--channels", "0")
    assert rc == 2 and "expected auto or a number >= 1, not '0'" in err
    assert dom.isActive()
    rc, _, err = run_cli("save", dom.name(), "--channels", "2")
    assert rc == 0, err
    assert engine.inspect(image_path(dom)).channels == 3  # main + 2 multifd channels
    rc, _, err = run_cli("start", dom.name())
    assert rc == 0 and dom.isActive(), err
    rc, _, err = run_cli("save", dom.name(), "--channels", "auto")
    assert rc == 0, err
    assert engine.inspect(image_path(dom)).channels == channels.auto_count(engine.usable_cpus())


def test_define_then_plain_libvirt_start_restores_the_defined_xml(make_guest):
    """Where the image is published at libvirt's managed-save path, the link
    follows the define: libvirt's own restore reads the new XML."""
    mem = 64
    dom = make_guest(mem)
    dom.suspend()
    ram = guest.ram_sha256(dom, mem)
    fastsave.managed_save(dom, mode="raw")  # a format every libvirt reads
    with fastsave.image_store(dom.connect()) as store:
        if getattr(store, "publication", None) is None or store.publication(dom.UUIDString()) is None:
            pytest.skip("the image is not published at libvirt's managed-save path here")
    xml = with_on_crash(fastsave.managed_save_get_xml_desc(dom, SECURE), "preserve")
    fastsave.managed_save_define_xml(dom, xml)
    with fastsave.image_store(dom.connect()) as store:
        pub = store.publication(dom.UUIDString())
        assert pub is not None and pub.linked  # the link leads to the new image
    dom.createWithFlags(START_PAUSED)  # libvirt's own restore, not fastsave's
    assert guest.ram_sha256(dom, mem) == ram
    assert "<on_crash>preserve</on_crash>" in dom.XMLDesc(0)
    dom.resume()
