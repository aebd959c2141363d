"""fastsave-guests.service and its settings, checked by systemd's own parser
(systemd-analyze verify) where it is installed."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastsave.config import load_host_settings, parse_host_settings
from fastsave.systemd import SETTINGS_TEXT, UNIT_NAME, install_units, stop_timeout

NO_CONFIG = "/nonexistent/fastsave.conf"
# libvirt's own units, as libvirt ships them (reduced to what orders them),
# so that verify loads fastsave's unit among them.
LIBVIRT_STUBS = {
    "libvirtd.service": "[Unit]\nDescription=libvirt\n[Service]\nExecStart=/bin/true\n",
    "libvirtd.socket": "[Unit]\nDescription=libvirt socket\n[Socket]\nListenStream=/run/libvirt/libvirt-sock\n",
    "virt-guest-shutdown.target": "[Unit]\nDescription=Libvirt guests shutdown\n",
    "libvirt-guests.service": (
        "[Unit]\nDescription=Suspend/Resume Running libvirt Guests\nWants=libvirtd.service\n"
        "Requires=virt-guest-shutdown.target\nAfter=network.target time-sync.target "
        "libvirtd.service virt-guest-shutdown.target\n[Service]\nType=oneshot\n"
        "RemainAfterExit=yes\nExecStart=/bin/true\nExecStop=/bin/true\nTimeoutStopSec=0\n"),
}


def _unit(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def _install(tmp_path: Path, settings: str | None = None) -> tuple[Path, Path]:
    env = tmp_path / "default" / "fastsave"
    if settings is not None:
        env.parent.mkdir(parents=True)
        env.write_text(settings)
    install_units(str(tmp_path / "units"), str(env), config_path=NO_CONFIG)
    return tmp_path / "units" / UNIT_NAME, env


def test_install_units_writes_the_unit_and_the_settings(tmp_path):
    unit, env = _install(tmp_path)
    assert env.read_text() == SETTINGS_TEXT and env.stat().st_mode & 0o777 == 0o644
    settings, warnings = load_host_settings(str(env))
    assert warnings == [] and settings.on_boot == "start" and settings.on_shutdown == "save"
    u = _unit(unit)
    assert u["Type"] == ["oneshot"] and u["RemainAfterExit"] == ["yes"]
    assert u["RequiresMountsFor"] == ["/var/lib/fastsave/images"]
    assert u["TimeoutStopSec"] == [stop_timeout(300)] == ["1200s"]
    after = u["After"][0].split()
    for dep in ("libvirtd.service", "libvirtd.socket", "virtqemud.service", "virtqemud.socket",
                "virt-guest-shutdown.target", "libvirt-guests.service"):
        assert dep in after
    assert u["Wants"] == ["virt-guest-shutdown.target"] and "Conflicts" not in u


def test_a_failed_boot_restore_cannot_skip_the_shutdown_save(tmp_path):
    """systemd runs ExecStop only for an active unit: the boot restore's
    failure is ignored ('-') and the unit stays active (RemainAfterExit)."""
    unit, env = _install(tmp_path)
    u = _unit(unit)
    (start,), (stop,) = u["ExecStart"], u["ExecStop"]
    assert start.startswith("-") and not stop.startswith("-")
    assert shlex.split(start[1:])[-4:] == ["restore-all", "--boot", "--settings", str(env)]
    assert shlex.split(stop)[-4:] == ["save-all", "--record", "--settings", str(env)]
    # The command it runs does fail when libvirt is unreachable, which is why
    # the '-' is needed: the unit must not inherit that failure.
    env.write_text("FASTSAVE_URI=qemu+unix:///system?socket=/nonexistent/sock\n")
    r = subprocess.run(shlex.split(start[1:]), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "error" in r.stderr


def test_exec_start_runs_with_the_settings_file(tmp_path):
    """The unit's boot command line as systemd would run it, on an embedded root."""
    import fastsave
    unit, env = _install(tmp_path)
    uri = fastsave.prepare_embed_root(tmp_path / "root")
    env.write_text(SETTINGS_TEXT.replace("FASTSAVE_URI=qemu:///system", f"FASTSAVE_URI={uri}")
                   .replace("START_DELAY=0", "START_DELAY=1\nBOGUS=1"))
    (start,) = _unit(unit)["ExecStart"]
    r = subprocess.run([*shlex.split(start[1:]), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "unknown setting 'BOGUS' ignored" in r.stderr
    assert '"domains": []' in r.stdout


def test_timeout_stop_sized_from_shutdown_timeout(tmp_path):
    unit, _ = _install(tmp_path / "a", "SHUTDOWN_TIMEOUT=60\n")
    assert _unit(unit)["TimeoutStopSec"] == ["720s"]
    unit, _ = _install(tmp_path / "b", "SHUTDOWN_TIMEOUT=0\n")
    assert _unit(unit)["TimeoutStopSec"] == ["infinity"]


def test_settings_bad_lines_fall_back_to_defaults():
    s, w = parse_host_settings("ON_BOOT=ignore\nON_SHUTDOWN=suspend\nSTART_DELAY='2.5'\n"
                               "PARALLEL_SHUTDOWN=0\nFASTSAVE_TIMEOUT=30\nnonsense\nX=1\n", "f")
    assert (s.on_boot, s.on_shutdown, s.start_delay, s.parallel, s.shutdown_timeout) == \
        ("ignore", "save", 2.5, None, 30.0)
    assert len(w) == 3 and "f:2: ON_SHUTDOWN='suspend' ignored" in w[0]


def test_settings_channels_auto_or_a_count():
    for text, want, warnings in (("FASTSAVE_CHANNELS=auto\n", "auto", 0),
                                 ("FASTSAVE_CHANNELS=4\n", 4, 0),
                                 ("FASTSAVE_CHANNELS=0\n", None, 1),
                                 ("FASTSAVE_CHANNELS=many\n", None, 1)):
        s, w = parse_host_settings(text, "f")
        assert (s.channels, len(w)) == (want, warnings), text


def test_settings_file_others_may_change_is_not_used(tmp_path):
    p = tmp_path / "fastsave"
    p.write_text("ON_SHUTDOWN=shutdown\n")
    os.chmod(p, 0o666)
    s, w = load_host_settings(str(p))
    assert s.on_shutdown == "save" and "may be changed by users other than root" in w[0]


def _verify(unit_dir: Path, *units: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # The test's units first, then the system's own (the trailing colon).
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run([tool, "verify", *map(str, units)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    unit, _ = _install(tmp_path)
    r = _verify(unit.parent, unit)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr


def test_systemd_analyze_verify_with_libvirt_units_and_libvirt_guests(tmp_path):
    """Among libvirt's units (libvirt-guests included): no ordering cycle, no
    warning; fastsave stops before libvirt-guests, the daemons and the target."""
    unit, _ = _install(tmp_path)
    for name, text in LIBVIRT_STUBS.items():
        (unit.parent / name).write_text(text)
    r = _verify(unit.parent, unit, unit.parent / "libvirt-guests.service")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr


def test_systemd_analyze_verify_is_a_real_check(tmp_path):
    """The same check refuses a broken unit (so the passes above mean something)."""
    unit, _ = _install(tmp_path)
    unit.write_text(unit.read_text().replace("ExecStop=", "ExecStop=relative/") + "Bogus=1\n")
    r = _verify(unit.parent, unit)
    assert r.returncode != 0 or r.stderr, r
    assert "Bogus" in r.stderr or "relative" in r.stderr


def test_systemd_analyze_verify_finds_an_ordering_cycle(tmp_path):
    """It also orders the units: a libvirt-guests ordered after fastsave's
    unit (while fastsave's is ordered after it) is refused as a cycle."""
    unit, _ = _install(tmp_path)
    for name, text in LIBVIRT_STUBS.items():
        (unit.parent / name).write_text(text)
    lg = unit.parent / "libvirt-guests.service"
    lg.write_text(lg.read_text().replace("[Service]", f"After={UNIT_NAME}\nWants={UNIT_NAME}\n[Service]"))
    r = _verify(unit.parent, unit, lg)
    assert r.returncode != 0 and "ordering cycle" in r.stderr, r.stderr


def test_python_m_fastsave_is_the_command_without_an_entry_point(tmp_path, monkeypatch):
    from fastsave import systemd
    monkeypatch.setattr(systemd.shutil, "which", lambda _name: None)
    assert systemd._command() == f"{sys.executable} -m fastsave"
