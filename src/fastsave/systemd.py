"""systemd wiring: like libvirt-guests.service, but saving all guests at once.

At boot (after libvirtd) the unit restores every autostart domain that has a
saved state; at shutdown, while libvirtd still runs, it saves all running
domains concurrently. Settings live in /etc/default/fastsave.
"""

from __future__ import annotations

import os
import shutil
import sys

__all__ = ["UNIT_NAME", "unit_text", "install_units"]

UNIT_NAME = "fastsave-guests.service"
UNIT_DIR = "/etc/systemd/system"
ENV_FILE = "/etc/default/fastsave"

ENV_TEXT = """\
# Settings for fastsave-guests.service.
# libvirt URI of the guests to save at shutdown and restore at boot.
FASTSAVE_URI=qemu:///system
# Domains saved at once (empty: from the core count).
FASTSAVE_PARALLEL=
# Seconds save-all may take; domains not started by then get FASTSAVE_ON_TIMEOUT.
FASTSAVE_TIMEOUT=300
# leave | shutdown | destroy, as libvirt-guests offers.
FASTSAVE_ON_TIMEOUT=shutdown
# Extra options for both commands, e.g. --mode zstd.
FASTSAVE_OPTS=
"""


def unit_text(command: str) -> str:
    return f"""\
[Unit]
Description=Save running guests at shutdown and restore them at boot (fastsave)
Wants=libvirtd.service
After=libvirtd.service virtlogd.service network.target time-sync.target
Conflicts=libvirt-guests.service

[Service]
Type=oneshot
RemainAfterExit=yes
EnvironmentFile=-{ENV_FILE}
ExecStart={command} --uri ${{FASTSAVE_URI}} restore-all $FASTSAVE_OPTS
ExecStop=/bin/sh -c '{command} --uri "$FASTSAVE_URI" save-all ${{FASTSAVE_PARALLEL:+--parallel $FASTSAVE_PARALLEL}} --timeout "$FASTSAVE_TIMEOUT" --on-timeout "$FASTSAVE_ON_TIMEOUT" $FASTSAVE_OPTS'
TimeoutStopSec=0
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
"""


def _command() -> str:
    exe = shutil.which("fastsave")
    return exe or f"{sys.executable} -m fastsave"


def install_units(unit_dir: str = UNIT_DIR, env_file: str = ENV_FILE) -> list[str]:
    """Writes the unit (and the settings file when there is none); returns the paths."""
    os.makedirs(unit_dir, exist_ok=True)
    unit = os.path.join(unit_dir, UNIT_NAME)
    with open(unit, "w", encoding="utf-8") as f:
        f.write(unit_text(_command()))
    written = [unit]
    if not os.path.exists(env_file):
        os.makedirs(os.path.dirname(env_file), exist_ok=True)
        with open(env_file, "w", encoding="utf-8") as f:
            f.write(ENV_TEXT)
        written.append(env_file)
    return written
