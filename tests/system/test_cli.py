"""The fastsave command, against the system libvirtd: human and --json output,
exit codes, and the progress display on a terminal and off it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import libvirt
import pytest

import fastsave
from fastsave import engine

pytestmark = [pytest.mark.qemu, pytest.mark.root]


def fs(*args: str, uri: str = "qemu:///system") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastsave", "--uri", uri, *args],
                          capture_output=True, text=True, timeout=300)


def test_single_domain_commands(make_system_guest):
    dom = make_system_guest(64)
    name = dom.name()
    r = fs("has", name)
    assert (r.returncode, r.stdout.strip()) == (0, "0")
    r = fs("save", name)
    assert r.returncode == 0 and f"Domain '{name}' state saved" in r.stdout
    r = fs("--json", "has", name)
    assert json.loads(r.stdout) == {"domain": name, "image": True}
    r = fs("--json", "list", "--images")  # the store's images, as `list` showed them before
    rows = [x for x in json.loads(r.stdout) if x["name"] == name]
    assert len(rows) == 1 and rows[0]["uuid"] == dom.UUIDString() and rows[0]["codec"] == "zstd"
    assert rows[0]["was_running"] is True and rows[0]["bytes"] > 0
    r = fs("list", "--images")
    assert r.returncode == 0 and name in r.stdout and "uuid" in r.stdout.splitlines()[0]
    r = fs("list", "--all", "--json")  # virsh list, options after the verb
    rows = [x for x in json.loads(r.stdout) if x["name"] == name]
    assert rows[0]["state"] == "saved" and rows[0]["managed_save"] is True
    assert rows[0]["image"]["codec"] == "zstd"
    r = fs("list", "--all")
    assert any(ln.split()[1:] == [name, "saved"] for ln in r.stdout.splitlines()[2:] if ln.strip())
    r = fs("list", "--name")
    assert r.returncode == 0 and name not in r.stdout.split()  # running domains only
    r = fs("dumpxml", dom.UUIDString())
    assert r.returncode == 0 and f"<name>{name}</name>" in r.stdout
    r = fs("verify", name)
    assert r.returncode == 0 and r.stdout.startswith("OK: ")
    path = fastsave.image_store(dom.connect()).image_path(dom.UUIDString())
    r = fs("--json", "inspect", path)
    assert json.loads(r.stdout)["name"] == name
    r = fs("start", name)
    assert r.returncode == 0 and dom.isActive()
    r = fs("save", name)
    r = fs("remove", name)
    assert r.returncode == 0 and fastsave.has_managed_save_image(dom) == 0


def test_exit_codes_and_errors(make_system_guest, tmp_path):
    r = fs("save", "no-such-domain-here")
    assert r.returncode == 1 and r.stderr.startswith("fastsave: error:") and "Traceback" not in r.stderr
    r = fs("--debug", "save", "no-such-domain-here")
    assert r.returncode == 1 and "Traceback" in r.stderr
    r = fs("frobnicate")
    assert r.returncode == 2
    dom = make_system_guest(64)
    fs("save", dom.name())
    path = Path(fastsave.image_store(dom.connect()).image_path(dom.UUIDString()))
    bad = tmp_path / "bad.img"
    raw = bytearray(path.read_bytes())
    info = engine.inspect(path)
    raw[info.payload_offset + 100] ^= 1
    bad.write_bytes(raw)
    r = fs("--json", "verify", str(bad))
    assert r.returncode == 4 and json.loads(r.stdout)["ok"] is False


def test_save_all_restore_all_json(make_system_guest):
    doms = [make_system_guest(64) for _ in range(2)]
    names = [d.name() for d in doms]
    r = fs("--json", "save-all", *names)
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["ok"] and {d["name"] for d in out["domains"]} == set(names)
    assert all(d["action"] == "saved" for d in out["domains"])
    r = fs("--json", "restore-all", *names)
    out = json.loads(r.stdout)
    assert r.returncode == 0 and all(d["action"] == "restored" for d in out["domains"])
    assert all(d.isActive() for d in doms)
    r = fs("--json", "save-all", *names, "no-such-domain")  # unknown names are ignored
    assert r.returncode == 0
    # a domain that vanished between save and restore (with its state, as libvirt
    # refuses to undefine a domain whose state it can restore)
    doms[0].undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
    r = fs("--json", "restore-all", "--all")
    assert r.returncode in (0, 3)


def test_progress_plain_lines_when_not_a_terminal(make_system_guest):
    doms = [make_system_guest(64) for _ in range(2)]
    r = fs("save-all", *[d.name() for d in doms])
    assert r.returncode == 0
    assert "\x1b[" not in r.stdout  # no cursor movement into a file or pipe
    for d in doms:
        assert f"{d.name()}: saved in " in r.stdout
    assert "2/2 domains ok" in r.stdout


@pytest.mark.skipif(shutil.which("script") is None, reason="util-linux `script` is needed for a pty")
def test_progress_bar_on_a_terminal(make_system_guest):
    doms = [make_system_guest(64) for _ in range(2)]
    cmd = f"{sys.executable} -m fastsave --uri qemu:///system save-all {' '.join(d.name() for d in doms)}"
    r = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout
    assert "\x1b[K" in r.stdout and "total" in r.stdout and "MB/s" in r.stdout
    assert "2/2 domains ok" in r.stdout
    for d in doms:
        assert d.name()[:24] in r.stdout


def test_json_of_single_domain_commands(make_system_guest):
    dom = make_system_guest(64)
    name = dom.name()
    r = fs("--json", "save", name)
    assert r.returncode == 0 and json.loads(r.stdout) == {"domain": name, "saved": True}
    path = fastsave.image_store(dom.connect()).image_path(dom.UUIDString())
    r = fs("inspect", path)  # human form: one field per line
    assert r.returncode == 0 and f"name               {name}" in r.stdout
    r = fs("--json", "verify", name)
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True
    r = fs("--json", "start", "--paused", name)
    assert r.returncode == 0 and json.loads(r.stdout) == {"domain": name, "started": True}
    assert dom.state()[0] == 3  # VIR_DOMAIN_PAUSED
    dom.resume()
    r = fs("--json", "save", name)
    r = fs("--json", "remove", name)
    assert r.returncode == 0 and json.loads(r.stdout) == {"domain": name, "removed": True}
    r = fs("--json", "start", name)
    assert r.returncode == 0 and dom.isActive()
    r = fs("--json", "save", "--running", "--paused", name)
    assert r.returncode == 2  # mutually exclusive flags: a usage error
