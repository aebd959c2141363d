"""Saves and restores over several migration channels (QEMU's multifd) with
real TCG guests under the embedded driver: the channel layer on its own
(fastsave.channels with a recorder in place of the engine), and managed
save/start with Options(channels=N)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

libvirt = pytest.importorskip("libvirt")

from fastsave import channels  # noqa: E402
from fastsave.virt import qmp  # noqa: E402
from testkit import guest  # noqa: E402

pytestmark = pytest.mark.qemu
MEM_MIB = 128
INCOMING = (f"<qemu:commandline xmlns:qemu='{guest.QEMU_NS}'><qemu:arg value='-incoming'/>"
            "<qemu:arg value='defer'/></qemu:commandline></domain>")

# A process other than QEMU that connects to a migration socket and offers a
# multifd channel header; prints what it got back ("closed" when refused).
INTRUDER = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall((0x11223344).to_bytes(4, "big") + bytes(60))
print("connected", flush=True)
s.settimeout(60)
try:
    print("closed" if s.recv(1) == b"" else "data", flush=True)
except OSError as e:
    print("closed", e, flush=True)
"""


def _need_multifd(dom: object) -> None:
    caps = qmp(dom, "query-migrate-capabilities")
    if not any(c.get("capability") == "multifd" for c in caps):
        pytest.skip("this QEMU has no multifd migration capability")


def _drain(fds: list[int], out_dir: str) -> tuple[list[threading.Thread], list[str]]:
    paths = [os.path.join(out_dir, f"ch{i}") for i in range(len(fds))]

    def copy(fd: int, path: str) -> None:
        with open(fd, "rb", buffering=0) as src, open(path, "wb") as dst:
            while data := src.read(1 << 20):
                dst.write(data)
    threads = [threading.Thread(target=copy, args=(fd, p), daemon=True) for fd, p in zip(fds, paths)]
    for t in threads:
        t.start()
    return threads, paths


def _wait(dom: object, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = qmp(dom, "query-migrate") or {}
        if st.get("status") == "completed":
            return
        assert st.get("status") not in ("failed", "cancelled"), st
        assert time.monotonic() < deadline, st
        time.sleep(0.02)


def _intruder(path: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-I", "-c", INTRUDER, path],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "connected"
    return proc


def test_channels_carry_a_libvirt_domain_both_ways(make_guest, embed_conn, kernel,
                                                   tmp_path: Path) -> None:
    """Main + 2 multifd channels out of a libvirt domain's QEMU, each to its
    own file, and back into a new QEMU of the same domain: RAM and registers
    equal, and the guest runs on. A foreign process that connects first is
    refused by the peer check and gets nothing."""
    dom = make_guest(MEM_MIB)
    _need_multifd(dom)
    dom.suspend()
    ram, regs = guest.ram_sha256(dom, MEM_MIB), guest.registers(dom)
    before = guest.read_state(dom)
    qmp(dom, "migrate-set-parameters", {"max-bandwidth": 1 << 40})
    out = channels.SaveChannels(dom, 2)
    try:
        st = os.stat(out.dir.path)
        assert st.st_mode & 0o777 == 0o700 and (st.st_uid, st.st_gid) == (out.dir.uid, out.dir.gid)
        intruder = _intruder(out.dir.socket)
        out.start()
        fds = out.accept()
    finally:
        out.close()
    assert out.refused == [intruder.pid]
    assert intruder.communicate(timeout=30)[0].startswith("closed")
    threads, paths = _drain(fds, str(tmp_path))
    _wait(dom)
    for t in threads:
        t.join(60)
    assert not os.path.exists(out.dir.path)
    dom.destroy()

    xml = guest.domain_xml(dom.name(), kernel, MEM_MIB, dom_uuid=dom.UUIDString())
    live = embed_conn.createXML(xml.replace("</domain>", INCOMING), libvirt.VIR_DOMAIN_START_PAUSED)
    back = channels.RestoreChannels(live, 2)
    try:
        back.start()
        fds = back.connect()
    finally:
        back.close()
    feeders = []
    for fd, path in zip(fds, paths):
        def feed(fd: int = fd, path: str = path) -> None:
            with open(path, "rb") as src, socket.socket(fileno=fd) as s:
                while data := src.read(1 << 20):
                    s.sendall(data)
        feeders.append(threading.Thread(target=feed, daemon=True))
        feeders[-1].start()
    _wait(live)
    for t in feeders:
        t.join(60)
    assert guest.ram_sha256(live, MEM_MIB) == ram
    assert guest.registers(live) == regs
    live.resume()
    time.sleep(0.5)
    after = guest.read_state(live)
    assert after.boot_id == before.boot_id and after.counter > before.counter


def test_restore_channels_refuse_a_socket_not_of_qemu(make_guest) -> None:
    """The restore side feeds only the domain's QEMU: a listener of another
    process at the path is refused before a byte of the guest is sent."""
    dom = make_guest(MEM_MIB, start=True)
    back = channels.RestoreChannels(dom, 2)
    try:
        fake = channels.listen(back.dir.socket, 4)
        with pytest.raises(channels.ChannelError, match="not to the domain's QEMU"):
            back.connect(timeout=2)
        fake.close()
    finally:
        back.close()


def test_socket_root_refuses_a_directory_others_may_write(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir(mode=0o777)
    os.chmod(root, 0o777)
    with pytest.raises(channels.ChannelError, match="writable only"):
        channels.SocketDir(os.getpid(), str(root))


# -- managed save and start with Options(channels=N) ------------------------------

def _image(dom) -> Path:
    import fastsave
    return Path(fastsave.image_store(dom.connect()).image_path(dom.UUIDString()))


@pytest.mark.parametrize("paused", [True, False], ids=["paused", "running"])
def test_managed_save_over_two_channels_restores_exact(make_guest, paused: bool) -> None:
    import fastsave
    from fastsave import engine
    dom = make_guest(MEM_MIB)
    _need_multifd(dom)
    if paused:
        dom.suspend()
        before = (guest.ram_sha256(dom, MEM_MIB), guest.registers(dom), guest.read_state(dom))
    else:
        st0 = guest.read_state(dom)
    assert fastsave.managed_save(dom, channels=2) == 0
    assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    info = engine.inspect(_image(dom))
    assert info.channels == 3  # main + 2 multifd channels
    if paused:
        assert fastsave.start(dom) == 0
        assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        assert (guest.ram_sha256(dom, MEM_MIB), guest.registers(dom), guest.read_state(dom)) == before
        caps = {c["capability"]: c["state"] for c in qmp(dom, "query-migrate-capabilities")}
        assert caps["multifd"] is False  # left as a plain start leaves it
        dom.resume()
        st0 = before[2]
    else:
        assert fastsave.start(dom) == 0
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    time.sleep(0.3)
    now = guest.read_state(dom)
    assert now.boot_id == st0.boot_id and now.counter > st0.counter
    assert fastsave.has_managed_save_image(dom) == 0 and not _image(dom).exists()


def test_foreign_connection_during_managed_save_is_refused(make_guest, monkeypatch) -> None:
    """A local process that connects to the save's socket before QEMU does is
    refused by the peer check, gets no byte, and the save completes."""
    import fastsave
    dom = make_guest(MEM_MIB)
    _need_multifd(dom)
    dom.suspend()
    ram = guest.ram_sha256(dom, MEM_MIB)
    seen: list = []
    start = channels.SaveChannels.start

    def start_after_an_intruder(self) -> None:  # the real socket, a real other process
        seen.append((self, _intruder(self.dir.socket)))
        start(self)
    monkeypatch.setattr(channels.SaveChannels, "start", start_after_an_intruder)
    assert fastsave.managed_save(dom, channels=2) == 0
    (chans, intruder), = seen
    assert chans.refused == [intruder.pid]
    assert intruder.communicate(timeout=30)[0].startswith("closed")
    assert not os.path.exists(chans.dir.path)
    fastsave.start(dom)
    assert guest.ram_sha256(dom, MEM_MIB) == ram


def _random_fill(path: Path, mib: int = 192) -> str:
    """Incompressible guest memory: the stream is long enough to hit mid-way."""
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    return str(path)


def _engine_children() -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "fastsave.worker"],
                         capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.parametrize("hit", ["killed", "stalled"])
def test_engine_failure_mid_save_with_channels_rolls_back(make_guest, tmp_path: Path,
                                                          hit: str) -> None:
    """The engine dies (or stops moving: the stall watchdog) while QEMU
    streams over its channels: QEMU's migration is cancelled, the guest is
    left paused as it was with its RAM intact and back on one stream, and
    no image is kept."""
    import fastsave
    from testkit.background import save_in_thread
    mem = 256
    dom = make_guest(mem, fill=_random_fill(tmp_path / "fill.bin"))
    _need_multifd(dom)
    dom.suspend()
    ram = guest.ram_sha256(dom, mem)
    store = Path(fastsave.image_store(dom.connect()).directory)
    t, result = save_in_thread(dom, mode="raw", direct=False, channels=2, stall_timeout=2)
    deadline = time.monotonic() + 60
    while not ([p for p in store.iterdir() if ".fastsave-tmp-" in p.name
                and p.stat().st_size > (16 << 20)] and _engine_children()):
        assert time.monotonic() < deadline and t.is_alive(), "the save ended before it could be hit"
        time.sleep(0.005)
    for pid in _engine_children():
        os.kill(pid, signal.SIGKILL if hit == "killed" else signal.SIGSTOP)
    t.join(90)
    err = result[0]
    assert isinstance(err, libvirt.libvirtError), "the save must fail"
    assert ("killed" in str(err)) if hit == "killed" else ("stalled" in str(err)), str(err)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    assert guest.ram_sha256(dom, mem) == ram
    caps = {c["capability"]: c["state"] for c in qmp(dom, "query-migrate-capabilities")}
    assert caps["multifd"] is False
    assert fastsave.has_managed_save_image(dom) == 0
    fastsave.image_store(dom.connect())  # opening the store cleans up what the dead engine left
    assert sorted(p.name for p in store.iterdir()
                  if not p.name.endswith(".lock") and p.name != ".fastsave-store") == []
    dom.resume()
    assert fastsave.managed_save(dom, channels=2) == 0  # and a save after it works
    fastsave.start(dom)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def test_qemu_killed_mid_save_with_channels(make_guest, tmp_path: Path, monkeypatch) -> None:
    """QEMU dies while its channels stream: the save fails naming it, no
    image is kept (a cut stream never passes for a saved state), and the
    socket directory is gone."""
    import fastsave
    from testkit.background import save_in_thread
    dom = make_guest(256, fill=_random_fill(tmp_path / "fill.bin"))
    _need_multifd(dom)
    made: list = []
    init = channels.SaveChannels.__init__

    def keep(self, *a, **kw) -> None:
        init(self, *a, **kw)
        made.append(self)
    monkeypatch.setattr(channels.SaveChannels, "__init__", keep)
    store = Path(fastsave.image_store(dom.connect()).directory)
    pid = int(Path(channels._pid_file(dom)).read_text())
    t, result = save_in_thread(dom, mode="raw", channels=2)
    deadline = time.monotonic() + 60
    while not [p for p in store.iterdir() if ".fastsave-tmp-" in p.name and p.stat().st_size > (8 << 20)]:
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    t.join(60)
    err = result[0]
    assert isinstance(err, libvirt.libvirtError)
    assert "no longer running" in str(err)
    assert fastsave.has_managed_save_image(dom) == 0
    assert sorted(p.name for p in store.iterdir()
                  if not p.name.endswith(".lock") and p.name != ".fastsave-store") == []
    assert made and not os.path.exists(made[0].dir.path)


def test_corrupt_multichannel_image_fails_start_and_is_kept(make_guest, tmp_path: Path) -> None:
    """A bad chunk in a multi-channel image ends the restore while QEMU takes
    its channels: the half-started QEMU is destroyed, the image kept, and
    the domain can still boot fresh."""
    import fastsave
    from fastsave import engine
    dom = make_guest(MEM_MIB, fill=_random_fill(tmp_path / "fill.bin", 64))
    _need_multifd(dom)
    fastsave.managed_save(dom, mode="raw", channels=2)
    p = _image(dom)
    info = engine.inspect(p)
    assert info.channels == 3
    b = bytearray(p.read_bytes())
    b[info.payload_offset + info.payload_length // 2] ^= 0xFF
    p.write_bytes(b)
    with pytest.raises(libvirt.libvirtError) as ei:
        fastsave.start(dom)
    assert "chunk" in str(ei.value) and "kept" in str(ei.value), str(ei.value)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    assert fastsave.has_managed_save_image(dom) == 1 and p.exists()
    assert not os.listdir(channels.SOCKET_ROOT) or all(
        not os.path.exists(os.path.join(channels.SOCKET_ROOT, d, channels.SOCKET_NAME))
        for d in os.listdir(channels.SOCKET_ROOT))
    fastsave.start(dom, libvirt.VIR_DOMAIN_START_FORCE_BOOT)
    guest.wait_booted(dom)
    assert fastsave.has_managed_save_image(dom) == 0


# -- the channel count a save gets when none is asked for -------------------------

def test_auto_count_is_one_stream_below_8_cpus_then_grows_to_16() -> None:
    got = {cpus: channels.auto_count(cpus) for cpus in (0, 1, 2, 4, 7, 8, 11, 12, 16, 32, 64, 1024)}
    assert got == {0: 1, 1: 1, 2: 1, 4: 1, 7: 1, 8: 2, 11: 2, 12: 3, 16: 4, 32: 8, 64: 16, 1024: 16}


def test_confined_reads_the_domains_security_labels() -> None:
    def xml(*labels: str) -> str:
        return "<domain type='qemu'><name>g</name>" + "".join(labels) + "</domain>"
    assert channels.confined(xml()) is None
    assert channels.confined(xml("<seclabel type='none' model='apparmor'/>")) is None
    assert channels.confined(xml("<seclabel type='none'/>", "<seclabel type='dynamic' model='dac'/>")) is None
    assert channels.confined(xml("<seclabel type='dynamic' model='apparmor' relabel='yes'/>")) == "apparmor"
    assert channels.confined(xml("<seclabel type='dynamic' model='dac'/>",
                                 "<seclabel type='static' model='selinux'/>")) == "selinux"
    assert channels.confined("<domain") == "unknown"  # unreadable: one stream


def test_choose_count_follows_cpus_qemu_and_confinement(make_guest, monkeypatch) -> None:
    dom = make_guest(MEM_MIB)
    _need_multifd(dom)
    assert channels.choose_count(dom, None, 2) == 1     # this machine's own CPUs
    assert channels.choose_count(dom, None, 16) == 4
    assert channels.choose_count(dom, 3, 2) == 3        # asked for: as asked
    with pytest.raises(channels.ChannelError, match="channels must be"):
        channels.choose_count(dom, 0, 16)
    real = dom.XMLDesc
    monkeypatch.setattr(type(dom), "XMLDesc", lambda self, f=0: real(f).replace(
        "</domain>", "<seclabel type='dynamic' model='apparmor'/></domain>"))
    assert channels.choose_count(dom, None, 16) == 1    # a confined QEMU keeps one stream


def test_default_save_chooses_channels_from_the_cpus(make_guest, monkeypatch) -> None:
    """Options() leaves the count to the save: one stream with this machine's
    CPUs; on a host with 16 CPUs (the count faked) 4 channels, and the image
    restores exactly."""
    import fastsave
    from fastsave import engine
    dom = make_guest(MEM_MIB)
    _need_multifd(dom)
    assert fastsave.Options().channels is None
    dom.suspend()
    before = (guest.ram_sha256(dom, MEM_MIB), guest.read_state(dom))
    if engine.usable_cpus() < 8:
        assert fastsave.managed_save(dom) == 0
        assert engine.inspect(_image(dom)).channels == 1
        assert fastsave.start(dom) == 0
        assert (guest.ram_sha256(dom, MEM_MIB), guest.read_state(dom)) == before
    monkeypatch.setattr(engine, "usable_cpus", lambda: 16)
    assert fastsave.managed_save(dom) == 0
    assert engine.inspect(_image(dom)).channels == 5  # main + 4
    assert fastsave.start(dom) == 0
    assert (guest.ram_sha256(dom, MEM_MIB), guest.read_state(dom)) == before
    monkeypatch.setattr(engine, "usable_cpus", lambda: 16)
    assert fastsave.managed_save(dom, threads=4) == 0  # a save given 4 CPUs: one stream
    assert engine.inspect(_image(dom)).channels == 1
    assert fastsave.start(dom) == 0


# -- migration settings another tool left behind ----------------------------------

def _leave_settings(dom, compression: bool) -> dict[str, bool]:
    """Turns on what another tool may leave on in a guest's QEMU: multifd and
    mapped-ram where QEMU has it (a guest restored by libvirt's parallel save;
    QEMU then refuses a migration to an fd), or multifd with zlib compression
    (QEMU refuses it beside mapped-ram); and pause-before-switchover (a
    migration would wait for ever) and x-ignore-shared. Returns the
    capabilities as they are afterwards."""
    have = {c["capability"] for c in qmp(dom, "query-migrate-capabilities")}
    for cap in ("multifd", "pause-before-switchover", "x-ignore-shared",
                *(() if compression else ("mapped-ram",))):
        if cap in have:
            qmp(dom, "migrate-set-capabilities", {"capabilities": [{"capability": cap, "state": True}]})
    if compression and "multifd-compression" in qmp(dom, "query-migrate-parameters"):
        qmp(dom, "migrate-set-parameters", {"multifd-compression": "zlib"})
    caps = {c["capability"]: c["state"] for c in qmp(dom, "query-migrate-capabilities")}
    assert caps["multifd"] and caps["pause-before-switchover"]
    return caps


def test_save_and_restore_pin_their_migration_settings(make_guest, monkeypatch) -> None:
    import fastsave
    from fastsave import engine, saving
    dom = make_guest(MEM_MIB)
    _need_multifd(dom)
    st0 = guest.read_state(dom)
    # one stream after mapped-ram (QEMU >= 9) and the rest; then multifd after
    # zlib compression (pinned to none: a fresh QEMU must load the image)
    for n, compression in ((1, False), (2, True), (1, True), (2, False)):
        _leave_settings(dom, compression)
        assert fastsave.managed_save(dom, channels=n) == 0
        assert engine.inspect(_image(dom)).channels == (1 if n == 1 else n + 1)
        assert fastsave.start(dom) == 0
        st = guest.read_state(dom)
        assert st.boot_id == st0.boot_id and st.counter >= st0.counter
    # a save that fails leaves the settings as it found them
    left = _leave_settings(dom, compression=False)

    def refuse(*a, **k):
        raise OSError("injected: the engine cannot start")
    monkeypatch.setattr(saving.EngineProcess, "save", refuse)
    with pytest.raises(libvirt.libvirtError, match="injected"):
        fastsave.managed_save(dom, channels=1)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert {c["capability"]: c["state"] for c in qmp(dom, "query-migrate-capabilities")} == left
