"""`mbrescue rescue` against a real Redfish service: OpenStack's sushy-tools emulator with
its libvirt driver, driving a real QEMU (TCG) domain with a blank disk.

The session fixture starts what the tests need, on this machine only: libvirt's daemons
(`virtlogd -d`, `libvirtd -d`: no systemd here), a directory storage pool (the emulator
downloads an inserted ISO's URL into it), and `sushy-emulator` bound to 127.0.0.1 with the
libvirt driver, the `vmedia` feature set and HTTP basic auth; everything is stopped after.
The emulator only sees the test's own domain (SUSHY_EMULATOR_ALLOWED_INSTANCES).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu

USER = "admin"
PASSWORD = "rescue-me"
POOL = "mbrescue-bmc-test"
DOMAIN = "mbrescue-bmc-test"
DISK_MIB = 512


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _virsh(*args: str, check: bool = True) -> str:
    result = subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def _wait_for(what: str, ready, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come up in {timeout_s:.0f} s")
        time.sleep(0.2)


def _daemon_pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="session")
def libvirt_daemons() -> Iterator[None]:
    """virtlogd and libvirtd as daemons (PID 1 is no systemd here); stopped after, by the
    pids they wrote, unless they were running before (then they are left as found)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: libvirtd runs QEMU domains as the system instance")
    for tool in ("virtlogd", "libvirtd", "virsh"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (make setup installs libvirt-daemon-system)")
    started: list[Path] = []
    for name in ("virtlogd", "libvirtd"):
        pidfile = Path(f"/run/{name}.pid")
        if _daemon_pid(pidfile) is None:
            subprocess.run([name, "-d"], check=True, stdin=subprocess.DEVNULL)
            _wait_for(name, lambda pidfile=pidfile: _daemon_pid(pidfile) is not None)
            started.append(pidfile)
    _wait_for("libvirtd's socket",
              lambda: subprocess.run(["virsh", "-c", "qemu:///system", "version"],
                                     capture_output=True).returncode == 0)
    yield
    for pidfile in reversed(started):
        pid = _daemon_pid(pidfile)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            _wait_for(f"{pidfile.stem} to stop", lambda pidfile=pidfile: _daemon_pid(pidfile) is None)


@dataclass(frozen=True)
class Bmc:
    url: str  # the emulator's root, http://127.0.0.1:PORT
    system_id: str  # the domain's UUID: Systems/<id>
    folder: Path  # disk, serial log, pool, password file; traversable by libvirt-qemu
    disk: Path
    serial_log: Path
    password_file: Path
    emulator_log: Path

    def blank_disk(self) -> None:
        """The domain off, its disk blank again (all zeroes, sparse), its serial log empty."""
        if "running" in _virsh("domstate", DOMAIN):
            _virsh("destroy", DOMAIN)
        with open(self.disk, "wb") as disk:
            disk.truncate(DISK_MIB << 20)
        os.chmod(self.disk, 0o666)
        self.serial_log.write_bytes(b"")
        os.chmod(self.serial_log, 0o666)

    def serial_text(self) -> str:
        return self.serial_log.read_text(errors="replace")

    def state(self) -> str:
        return _virsh("domstate", DOMAIN).strip()


DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>768</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><loader type='rom'>/usr/share/seabios/bios-256k.bin</loader><boot dev='hd'/></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='{serial}' append='on'/><target port='0'/></serial>
    <console type='file'><source path='{serial}' append='on'/><target type='serial' port='0'/></console>
    <graphics type='vnc' listen='127.0.0.1' autoport='yes'/>
    <video><model type='vga'/></video>
  </devices>
</domain>
"""


@pytest.fixture(scope="session")
def bmc(libvirt_daemons) -> Iterator[Bmc]:
    """A storage pool, a TCG domain with a blank disk and the Redfish emulator in front."""
    import bcrypt

    # QEMU runs as libvirt-qemu: every path it opens must be traversable by it.
    folder = Path(tempfile.mkdtemp(prefix="mbrescue-bmc-", dir="/var/tmp"))
    os.chmod(folder, 0o755)
    pool_dir = folder / "pool"
    pool_dir.mkdir(mode=0o755)
    domain_uuid = str(uuid.uuid4())
    disk, serial = folder / "disk.img", folder / "serial.log"
    for leftover in (DOMAIN,):  # a killed run's domain and pool
        _virsh("destroy", leftover, check=False)
        _virsh("undefine", leftover, check=False)
    _virsh("pool-destroy", POOL, check=False)
    _virsh("pool-undefine", POOL, check=False)
    _virsh("pool-define-as", POOL, "dir", "--target", str(pool_dir))
    _virsh("pool-start", POOL)
    (folder / "domain.xml").write_text(DOMAIN_XML.format(name=DOMAIN, uuid=domain_uuid,
                                                          disk=disk, serial=serial))
    _virsh("define", str(folder / "domain.xml"))
    password_file = folder / "password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    auth_file = folder / "htpasswd"
    auth_file.write_text(f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()}\n")
    port = _free_port()
    config = folder / "emulator.conf"
    config.write_text(
        f"SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\n"
        f"SUSHY_EMULATOR_LISTEN_PORT = {port}\n"
        f"SUSHY_EMULATOR_LIBVIRT_URI = 'qemu:///system'\n"
        f"SUSHY_EMULATOR_FEATURE_SET = 'vmedia'\n"
        f"SUSHY_EMULATOR_STORAGE_POOL = {POOL!r}\n"
        f"SUSHY_EMULATOR_ALLOWED_INSTANCES = [{domain_uuid!r}]\n"
        f"SUSHY_EMULATOR_AUTH_FILE = {str(auth_file)!r}\n"
    )
    emulator_log = folder / "emulator.log"
    emulator_bin = Path(sys.executable).parent / "sushy-emulator"
    with open(emulator_log, "wb") as log_stream:
        emulator = subprocess.Popen([emulator_bin, "--config", config], stdin=subprocess.DEVNULL,
                                    stdout=log_stream, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def answers() -> bool:
            assert emulator.poll() is None, emulator_log.read_text()
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        _wait_for("sushy-emulator", answers)
        found = Bmc(url=url, system_id=domain_uuid, folder=folder, disk=disk,
                    serial_log=serial, password_file=password_file, emulator_log=emulator_log)
        found.blank_disk()
        yield found
    finally:
        emulator.terminate()
        emulator.wait(30)
        _virsh("destroy", DOMAIN, check=False)
        _virsh("undefine", DOMAIN, check=False)
        _virsh("pool-destroy", POOL, check=False)
        _virsh("pool-undefine", POOL, check=False)
        shutil.rmtree(folder, ignore_errors=True)


def test_the_emulator_shows_the_domain_as_a_redfish_system(bmc):
    """The set-up itself: sushy, with the right credentials, finds the one system and its CD."""
    import sushy

    conn = sushy.Sushy(f"{bmc.url}/redfish/v1", username=USER, password=PASSWORD, verify=True)
    systems = conn.get_system_collection().get_members()
    assert [system.identity for system in systems] == [bmc.system_id]
    media = {member.identity for member in systems[0].virtual_media.get_members()}
    assert "Cd" in media


# ------------------------------------------------------------------ mbrescue rescue

HOST = "host-a"


def _redfish(bmc: Bmc):
    import sushy

    conn = sushy.Sushy(f"{bmc.url}/redfish/v1", username=USER, password=PASSWORD)
    system = conn.get_system(f"/redfish/v1/Systems/{bmc.system_id}")
    return system, system.virtual_media.get_member(
        f"/redfish/v1/Systems/{bmc.system_id}/VirtualMedia/Cd")


def _assert_nothing_left(bmc: Bmc) -> None:
    """No medium in the CD, no boot override: what the rescue set up is undone."""
    import sushy

    system, cd = _redfish(bmc)
    assert not cd.inserted and not cd.image, (cd.inserted, cd.image)
    # sushy-emulator keeps every override as Continuous: cleared there means the disk again.
    assert (system.boot.enabled == sushy.BootSourceOverrideEnabled.DISABLED
            or system.boot.target == sushy.BootSource.HDD), (system.boot.enabled,
                                                            system.boot.target)


@pytest.fixture(scope="module")
def unattended_iso(fixtures, tmp_path_factory) -> Path:
    """Fixture A's capture built into an ISO with the unattended opt-in."""
    from tests.conftest import mbrescue

    work = tmp_path_factory.mktemp("bmc-iso")
    source = work / "host-a.img"
    subprocess.run(["cp", "--sparse=always", fixtures["A"].path, source], check=True)
    capture = work / "host-a.mbrescue"
    result = mbrescue("capture", source, "-o", capture, "--hostname", HOST)
    assert result.returncode == 0, result.stderr
    source.unlink()
    iso = work / "host-a-rescue.iso"
    result = mbrescue("build", capture, "-o", iso, "--allow-unattended")
    assert result.returncode == 0, result.stderr
    return iso


def _rescue(bmc: Bmc, *args: str | os.PathLike[str], timeout: float = 900):
    from tests.conftest import mbrescue

    return mbrescue("rescue", HOST, "--bmc", bmc.url, "--user", USER, "--password-file",
                    bmc.password_file, "--serve-address", "127.0.0.1", *args, timeout=timeout)


def _wait_marker(bmc: Bmc, marker: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while marker not in bmc.serial_text():
        if time.monotonic() > deadline:
            raise AssertionError(f"no marker {marker!r} in {timeout_s:.0f} s; serial log "
                                 f"ends:\n{bmc.serial_text()[-3000:]}")
        time.sleep(1)


def test_blank_disk_rescued_through_the_bmc_boots_to_its_marker(bmc, fixtures, unattended_iso):
    """Blank disk → `mbrescue rescue` (unattended ISO, explicit target) → restore complete
    (the rescue system powers off, seen over Redfish) → ejected, override cleared, powered
    on → the domain boots its restored disk to fixture A's marker on its serial console."""
    bmc.blank_disk()
    result = _rescue(bmc, "--iso", unattended_iso, "--target", "/dev/vda")
    serial = bmc.serial_text()
    assert result.returncode == 0, f"{result.stderr}\n--- serial:\n{serial[-4000:]}"
    assert "mbrescue: unattended restore" in serial
    assert "mbrescue: restore complete: /dev/vda" in serial
    assert "restore complete" in result.stderr
    _wait_marker(bmc, fixtures["A"].marker, 240)
    _assert_nothing_left(bmc)
    # The first sector of the disk is the capture's (the fixture's) again.
    with open(fixtures["A"].path, "rb") as want, open(bmc.disk, "rb") as got:
        assert got.read(512) == want.read(512)


def _one_error_line(result) -> str:
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mbrescue: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def test_wrong_credentials_are_one_line_and_leave_nothing(bmc, unattended_iso, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    from tests.conftest import mbrescue

    result = mbrescue("rescue", HOST, "--bmc", bmc.url, "--user", USER, "--password-file", wrong,
                      "--iso", unattended_iso, "--serve-address", "127.0.0.1")
    assert "refused the credentials" in _one_error_line(result)
    _assert_nothing_left(bmc)


def test_an_unreachable_bmc_is_one_line(unattended_iso):
    from tests.conftest import mbrescue

    result = mbrescue("rescue", HOST, "--bmc", f"http://127.0.0.1:{_free_port()}",
                      "--iso", unattended_iso, "--serve-address", "127.0.0.1")
    assert "unreachable" in _one_error_line(result)


def test_media_already_in_use_is_refused_without_force(bmc, unattended_iso, tmp_path):
    """Someone else's medium in the virtual CD: refused, and still there after."""
    import http.server
    import threading

    (tmp_path / "theirs.iso").write_bytes(b"\0" * 65536)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _, cd = _redfish(bmc)
    try:
        cd.insert_media(f"http://127.0.0.1:{server.server_address[1]}/theirs.iso")
        result = _rescue(bmc, "--iso", unattended_iso)
        assert "already holds" in _one_error_line(result)
        _, cd = _redfish(bmc)
        assert cd.inserted or cd.image
    finally:
        cd.eject_media()
        server.shutdown()
        server.server_close()
    _assert_nothing_left(bmc)


def test_no_restore_within_the_timeout_is_one_line_and_leaves_nothing(bmc, unattended_iso):
    """A target no disk has: the runner does not restore, the machine stays on, the rescue
    times out; medium ejected and override cleared all the same."""
    bmc.blank_disk()
    result = _rescue(bmc, "--iso", unattended_iso, "--target", "NO-SUCH-SERIAL",
                     "--timeout", "60")
    assert "no restore complete within 60 s" in _one_error_line(result)
    _assert_nothing_left(bmc)
    assert "restore complete" not in bmc.serial_text()
    bmc.blank_disk()


class _IgnoringOverride:
    """A Redfish front that forwards everything to the emulator except a PATCH of the
    system's boot override, which it answers 204 and drops: a BMC that says yes and does
    nothing (the emulator itself always honours the override)."""

    def __init__(self, upstream: str, system_id: str) -> None:
        import http.server
        import threading
        import urllib.error
        import urllib.request

        system_path = f"/redfish/v1/Systems/{system_id}"

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self.command == "PATCH" and self.path.rstrip("/") == system_path \
                        and body and b"BootSourceOverride" in body:
                    self.send_response(204)
                    self.end_headers()
                    return
                request = urllib.request.Request(upstream + self.path, data=body,
                                                 method=self.command)
                for key, value in self.headers.items():
                    if key.lower() not in ("host", "content-length", "connection"):
                        request.add_header(key, value)
                try:
                    with urllib.request.urlopen(request, timeout=60) as answer:
                        status, headers, data = answer.status, answer.headers, answer.read()
                except urllib.error.HTTPError as error:
                    status, headers, data = error.code, error.headers, error.read()
                self.send_response(status)
                for key, value in headers.items():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = do_HEAD = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_bmc_that_ignores_the_boot_override_is_one_line_and_leaves_nothing(bmc,
                                                                            unattended_iso):
    """The override is read back before the machine is powered: a BMC that accepted it and
    did nothing is refused in one line, the medium ejected, the machine never started."""
    import dataclasses

    import sushy

    system, _ = _redfish(bmc)
    was = system.power_state
    front = _IgnoringOverride(bmc.url, bmc.system_id)
    try:
        result = _rescue(dataclasses.replace(bmc, url=front.url), "--iso", unattended_iso,
                         timeout=300)
        assert "ignored the boot override" in _one_error_line(result)
    finally:
        front.close()
    _assert_nothing_left(bmc)
    system, _ = _redfish(bmc)
    assert system.power_state == was or system.power_state == sushy.PowerState.OFF
