"""The systemd units fastsave installs for host shutdown and boot."""
from __future__ import annotations

import subprocess
import sys


def test_install_units(tmp_path):
    r = subprocess.run([sys.executable, "-c", (
        "from fastsave.units import install_units;"
        f"print(install_units('{tmp_path}/units', '{tmp_path}/default/fastsave'))")],
        capture_output=True, text=True)
    assert r.returncode == 0
    unit = (tmp_path / "units" / "fastsave-guests.service").read_text()
    assert "After=libvirtd.service" in unit and "restore-all" in unit and "save-all" in unit
    assert "EnvironmentFile=-" in unit and "TimeoutStopSec=0" in unit
    env = (tmp_path / "default" / "fastsave").read_text()
    assert "FASTSAVE_TIMEOUT=" in env and "FASTSAVE_ON_TIMEOUT=" in env
