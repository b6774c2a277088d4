"""The Ansible role (ansible/rescue.yml) run by the real ansible-playbook against three hosts.

The hosts are fixtures A, B and D on this machine (`ansible_connection=local`), each with a
copy of its fixture image as `mbrescue_source`, its /boot partition loop-mounted (so that
`check` compares /boot's files, as on a live host), and its own bundle and capture paths.
Their `ansible_python_interpreter` does not exist: any task that needed Python on a host
would fail. The ISOs are really built and verified (3 on the first run, 1 after a change).
With mbrescue_install_hooks each host's `install` goes into its own temporary root
(mbrescue_install_root), never into this machine's /etc or systemd.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, mbrescue, sh

pytestmark = pytest.mark.root

ANSIBLE_DIR = ROOT / "ansible"
VENV_BIN = Path(sys.executable).parent
PLAYBOOK = VENV_BIN / "ansible-playbook"
HOSTS = {"hostA": "A", "hostB": "B", "hostD": "D"}
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)",
                   re.MULTILINE)


def _environment(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_LOCAL_TEMP": os.fspath(tmp / "ansible-local"),
        "ANSIBLE_REMOTE_TEMP": os.fspath(tmp / "ansible-remote"),
        "ANSIBLE_HOME": os.fspath(tmp / "ansible-home"),
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
    }


def playbook(tmp: Path, inventory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [os.fspath(PLAYBOOK), "-i", os.fspath(inventory), os.fspath(ANSIBLE_DIR / "rescue.yml"),
         *extra],
        cwd=tmp, env=_environment(tmp), text=True, capture_output=True,
        stdin=subprocess.DEVNULL, timeout=1500,
    )


def recap(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, int]]:
    counts = {}
    for host, ok, changed, unreachable, failed in RECAP.findall(result.stdout):
        counts[host] = {"ok": int(ok), "changed": int(changed),
                        "unreachable": int(unreachable), "failed": int(failed)}
    return counts


def task_lines(result: subprocess.CompletedProcess[str], name: str) -> list[str]:
    """The per-host lines ("ok: [hostA -> localhost]", "skipping: ...") under one task."""
    marker = f"TASK [mbrescue : {name}]"
    assert result.stdout.count(marker) == 1, result.stdout[-3000:]
    section = result.stdout.split(marker, 1)[1].split("\n", 1)[1].split("TASK [", 1)[0]
    return [line for line in section.splitlines() if re.match(r"^\w+: \[", line)]


BUILD = "Build the ISOs of the hosts with a new capture, in one run"
VERIFY = "Verify the new ISO"


def _boot_partition(image: Path, number: int) -> tuple[int, int]:
    """(offset, size) in bytes of partition `number`, as sfdisk reads the image."""
    table = json.loads(sh("sfdisk", "--json", image))["partitiontable"]
    sector = table.get("sectorsize", 512)
    part = next(p for p in table["partitions"] if p["node"].endswith(str(number)))
    return part["start"] * sector, part["size"] * sector


class Fleet:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.output = root / "out"
        self.inventory = root / "inventory.yml"
        self.sources: dict[str, Path] = {}
        self.boots: dict[str, Path] = {}
        self.host_captures: dict[str, Path] = {}

    def iso(self, host: str) -> Path:
        return self.output / "iso" / f"{host}-rescue.iso"

    def capture(self, host: str) -> Path:
        return self.output / "captures" / f"{host}.mbrescue"

    def install_root(self, host: str) -> Path:
        return self.root / host / "root"

    def mtimes(self) -> dict[str, int]:
        files = [self.iso(h) for h in HOSTS] + [self.capture(h) for h in HOSTS]
        return {os.fspath(f): f.stat().st_mtime_ns for f in files}


@pytest.fixture(scope="module")
def fleet(fixtures, tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    state = Fleet(root)
    hosts = {}
    mounted: list[tuple[Path, str]] = []
    try:
        for host, name in HOSTS.items():
            fixture = fixtures[name]
            home = root / host
            home.mkdir()
            image = home / "disk.img"
            sh("cp", "--sparse=always", fixture.path, image)
            offset, size = _boot_partition(image, fixture.boot_partition)
            loop = sh("losetup", "--find", "--show", "-o", str(offset), "--sizelimit", str(size),
                      image).strip()
            boot = home / "boot"
            boot.mkdir()
            try:
                sh("mount", loop, boot)
            except AssertionError:
                sh("losetup", "-d", loop)
                raise
            mounted.append((boot, loop))
            state.sources[host], state.boots[host] = image, boot
            state.host_captures[host] = home / "var" / "host.mbrescue"
            hosts[host] = {
                "ansible_connection": "local",
                # No Python on these hosts: a task that needed it would fail.
                "ansible_python_interpreter": "/nonexistent/python3",
                "mbrescue_source": os.fspath(image),
                "mbrescue_host_bundle_path": os.fspath(home / "bin" / "mbrescue-host"),
                "mbrescue_host_capture_path": os.fspath(state.host_captures[host]),
                # Install (mbrescue_install_hooks) goes here, never into this machine's /.
                "mbrescue_install_root": os.fspath(state.install_root(host)),
            }
            state.install_root(host).mkdir()
        inventory = {"all": {"hosts": hosts, "vars": {
            "mbrescue_command": os.fspath(VENV_BIN / "mbrescue"),
            "mbrescue_output_dir": os.fspath(state.output),
            "mbrescue_jobs": 2,
        }}}
        state.inventory.write_text(json.dumps(inventory, indent=1))
        yield state
    finally:
        for boot, loop in reversed(mounted):
            subprocess.run(["umount", boot], check=False)
            subprocess.run(["losetup", "-d", loop], check=False)


def _assert_ok(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, int]]:
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    counts = recap(result)
    assert set(HOSTS) <= set(counts), result.stdout[-3000:]
    return counts


def test_first_run_builds_three_verified_isos(fleet):
    result = playbook(fleet.root, fleet.inventory)
    counts = _assert_ok(result)
    assert all(counts[h]["changed"] > 0 and counts[h]["failed"] == 0 for h in HOSTS), counts
    for host in HOSTS:
        assert fleet.iso(host).is_file(), host
        assert fleet.host_captures[host].is_file(), host
        assert (fleet.capture(host).stat().st_mode & 0o777) == 0o600
        assert sh("sha256sum", fleet.capture(host)).split()[0] == \
            sh("sha256sum", fleet.host_captures[host]).split()[0]
        inspected = mbrescue("inspect", "--json", fleet.capture(host))
        assert json.loads(inspected.stdout)["hostname"] == host, inspected.stderr
    # One build for the three, then each ISO verified (a failed verify fails its host).
    assert [line for line in task_lines(result, BUILD) if not line.startswith("skipping")] == \
        ["changed: [hostA -> localhost]"]
    assert sorted(task_lines(result, VERIFY)) == [f"ok: [{h} -> localhost]" for h in HOSTS]


def test_second_run_changes_nothing(fleet):
    before = fleet.mtimes()
    result = playbook(fleet.root, fleet.inventory)
    counts = _assert_ok(result)
    assert all(counts[h]["changed"] == 0 for h in HOSTS), counts
    assert fleet.mtimes() == before
    assert all(line.startswith("skipping") for line in task_lines(result, BUILD))
    assert all(line.startswith("skipping") for line in task_lines(result, VERIFY))


def test_changed_boot_rebuilds_only_that_host(fleet):
    before = fleet.mtimes()
    old_capture = fleet.capture("hostB").read_bytes()
    # A file added to hostB's mounted /boot, as a kernel update would.
    (fleet.boots["hostB"] / "config-ansible-test").write_text("CONFIG_TEST=y\n")
    sh("sync")
    result = playbook(fleet.root, fleet.inventory)
    counts = _assert_ok(result)
    assert counts["hostB"]["changed"] > 0, counts
    assert counts["hostA"]["changed"] == 0 and counts["hostD"]["changed"] == 0, counts
    after = fleet.mtimes()
    changed = {path for path in after if after[path] != before[path]}
    assert changed == {os.fspath(fleet.iso("hostB")), os.fspath(fleet.capture("hostB"))}
    # The older capture is kept as the next generation, with the same mode.
    older = Path(f"{fleet.capture('hostB')}.1")
    assert older.read_bytes() == old_capture
    assert (older.stat().st_mode & 0o777) == 0o600
    assert not Path(f"{fleet.capture('hostA')}.1").exists()
    assert [line for line in task_lines(result, BUILD) if not line.startswith("skipping")] == \
        ["changed: [hostB -> localhost]"]
    assert [line for line in task_lines(result, VERIFY) if not line.startswith("skipping")] == \
        ["ok: [hostB -> localhost]"]


def test_publish_copies_every_iso_once(fleet):
    publish = fleet.root / "publish"
    publish.mkdir()
    before = fleet.mtimes()
    for run in (1, 2):
        result = playbook(fleet.root, fleet.inventory, "-e", f"mbrescue_publish_dir={publish}")
        counts = _assert_ok(result)
        assert all(counts[h]["changed"] == (1 if run == 1 else 0) for h in HOSTS), counts
    assert fleet.mtimes() == before  # nothing built
    for host in HOSTS:
        copy = publish / fleet.iso(host).name
        assert copy.read_bytes() == fleet.iso(host).read_bytes()
        assert (copy.stat().st_mode & 0o777) == 0o640


INSTALL = "Install the host side's kernel hooks and refresh timer"
HOOK_FILES = ["usr/local/sbin/mbrescue-host", "etc/mbrescue/host.conf",
              "etc/mbrescue/installed.json", "etc/kernel/postinst.d/zz-mbrescue",
              "etc/kernel/postrm.d/zz-mbrescue", "etc/kernel/install.d/95-mbrescue.install",
              "etc/initramfs/post-update.d/zz-mbrescue",
              "etc/systemd/system/mbrescue-refresh.service",
              "etc/systemd/system/mbrescue-refresh.timer",
              "etc/systemd/system/mbrescue-refresh-soon.timer"]


def tree(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry under root with its mode, mtime and content: a rewrite shows."""
    seen = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        content = (os.readlink(path) if path.is_symlink() else
                   sh("sha256sum", path).split()[0] if path.is_file() else "dir")
        seen[os.fspath(path.relative_to(root))] = (st.st_mode, st.st_mtime_ns, content)
    return seen


def test_install_hooks_installs_once_then_changes_nothing(fleet):
    before = fleet.mtimes()
    installed = {}
    for run in (1, 2):
        result = playbook(fleet.root, fleet.inventory, "-e", "mbrescue_install_hooks=true")
        counts = _assert_ok(result)
        # The first run's only change is the install; the second changes nothing at all.
        assert all(counts[h]["changed"] == (1 if run == 1 else 0) for h in HOSTS), counts
        word = "changed" if run == 1 else "ok"
        assert sorted(task_lines(result, INSTALL)) == [f"{word}: [{h}]" for h in HOSTS]
        trees = {host: tree(fleet.install_root(host)) for host in HOSTS}
        if run == 1:
            installed = trees
    assert trees == installed  # the second install rewrote nothing (contents, modes, mtimes)
    assert fleet.mtimes() == before  # and nothing was captured or built
    for host in HOSTS:
        root = fleet.install_root(host)
        for name in HOOK_FILES:
            assert (root / name).is_file(), (host, name)
        assert os.access(root / "etc/kernel/postinst.d/zz-mbrescue", os.X_OK)
        assert (root / "usr/local/sbin/mbrescue-host").read_bytes() == \
            (fleet.output / "bundle" / "mbrescue-host").read_bytes()
        config = (root / "etc/mbrescue/host.conf").read_text()
        assert f"capture_dir = {fleet.host_captures[host].parent}\n" in config
        assert f"hostname = {host}\n" in config
        assert f"source = {fleet.sources[host]}\n" in config
        capture_dir = root / os.fspath(fleet.host_captures[host].parent).lstrip("/")
        assert (capture_dir.stat().st_mode & 0o777) == 0o700
        # What the role installed is what the bundle's own uninstall can remove (dry: the
        # hooks stay for the next run; the record names every file).
        recorded = json.loads((root / "etc/mbrescue/installed.json").read_text())
        assert {item["path"].lstrip("/") for item in recorded["files"]} >= \
            set(HOOK_FILES) - {"etc/mbrescue/installed.json"}

    # Back to false: the role leaves what it installed in place and reports nothing.
    result = playbook(fleet.root, fleet.inventory)
    counts = _assert_ok(result)
    assert all(counts[h]["changed"] == 0 for h in HOSTS), counts
    assert all(line.startswith("skipping") for line in task_lines(result, INSTALL))
    assert {host: tree(fleet.install_root(host)) for host in HOSTS} == installed


FORGED = "Fail the host when its capture is for another host"


def _digests(paths: list[Path]) -> dict[str, tuple[str, int]]:
    return {os.fspath(p): (sh("sha256sum", p).split()[0], p.stat().st_mtime_ns) for p in paths}


def test_a_capture_claiming_another_host_fails_only_that_host(fleet):
    """hostB is compromised: its capture on the host (a real capture of its disk) records
    the name hostA, and check finds it matching the disk, so the controller fetches it. The
    run fails hostB with one line; hostA's ISO, capture and published copy stay byte for
    byte; hostD, whose /boot changed in the same run, is built, verified and published. The
    next run (nothing changed) fails hostB again: the name is checked on every run."""
    publish = fleet.root / "publish"
    publish.mkdir(exist_ok=True)
    for host in HOSTS:  # as test_publish_copies_every_iso_once left it (also when run alone)
        copy = publish / fleet.iso(host).name
        shutil.copyfile(fleet.iso(host), copy)
        copy.chmod(0o640)
    kept = [fleet.iso("hostA"), publish / fleet.iso("hostA").name, fleet.capture("hostA"),
            fleet.iso("hostB"), publish / fleet.iso("hostB").name]
    before = _digests(kept)
    forged = mbrescue("capture", fleet.sources["hostB"], "-o", fleet.host_captures["hostB"],
                      "--hostname", "hostA")
    assert forged.returncode == 0, forged.stderr
    (fleet.boots["hostD"] / "config-ansible-forged").write_text("CONFIG_HONEST=y\n")
    sh("sync")
    old_d = sh("sha256sum", fleet.iso("hostD")).split()[0]
    for run in (1, 2):
        result = playbook(fleet.root, fleet.inventory, "-e", f"mbrescue_publish_dir={publish}")
        assert result.returncode != 0, result.stdout[-3000:]
        counts = recap(result)
        assert counts["hostB"]["failed"] == 1, counts
        assert counts["hostA"]["failed"] == 0 and counts["hostA"]["changed"] == 0, counts
        assert counts["hostD"]["failed"] == 0, counts
        fatal = [line for line in result.stdout.splitlines() if line.startswith("fatal:")]
        assert len(fatal) == 1 and fatal[0].startswith("fatal: [hostB"), fatal
        assert re.search(r"the capture from hostB \(\S+\) is for host \\?\"hostA\\?\", not "
                         r"\\?\"hostB\\?\": not built", fatal[0]), fatal[0]
        assert [line for line in task_lines(result, FORGED) if not line.startswith("skipping")] \
            == [fatal[0]]
        assert _digests(kept) == before
        if run == 1:  # the honest host with a new /boot: built alone, verified, published
            assert counts["hostD"]["changed"] > 0, counts
            assert [line for line in task_lines(result, BUILD)
                    if not line.startswith("skipping")] == ["changed: [hostD -> localhost]"]
            assert [line for line in task_lines(result, VERIFY)
                    if not line.startswith("skipping")] == ["ok: [hostD -> localhost]"]
            assert sh("sha256sum", fleet.iso("hostD")).split()[0] != old_d
            assert (publish / fleet.iso("hostD").name).read_bytes() == \
                fleet.iso("hostD").read_bytes()
        else:
            assert counts["hostD"]["changed"] == 0, counts
            assert all(line.startswith("skipping") for line in task_lines(result, BUILD))
    # The forged capture is kept under the name of the host it came from, and only there.
    claimed = json.loads(mbrescue("inspect", "--json", fleet.capture("hostB")).stdout)
    assert claimed["hostname"] == "hostA"
    assert sorted(p.name for p in fleet.iso("hostA").parent.iterdir()) == \
        sorted(fleet.iso(h).name for h in HOSTS)


def test_a_vault_passphrase_encrypts_the_rebuilt_iso(fleet, tmp_path):
    """`mbrescue_passphrase` (issue 21): the ISO rebuilt for a changed host holds its
    capture age-encrypted; the passphrase reaches build and verify by the environment and
    appears in no command line the run prints."""
    secret = "vault-passphrase-for-the-test"
    (fleet.boots["hostB"] / "config-encrypt-test").write_text("CONFIG_ENCRYPT=y\n")
    result = playbook(fleet.root, fleet.inventory, "-e", f"mbrescue_passphrase={secret}")
    counts = _assert_ok(result)
    assert counts["hostB"]["failed"] == 0 and counts["hostB"]["changed"] > 0, counts
    assert b"age-encryption.org/v1" in fleet.iso("hostB").read_bytes()
    assert secret not in result.stdout.replace(f"mbrescue_passphrase={secret}", "")


def test_check_error_fails_the_host_with_its_line(fleet, tmp_path):
    # A capture on the host that is not a capture: check exits 2, the host fails, naming it.
    bad = tmp_path / "host.mbrescue"
    bad.write_bytes(b"not a capture\n")
    inventory = json.loads(fleet.inventory.read_text())
    host = dict(inventory["all"]["hosts"]["hostA"], mbrescue_host_capture_path=os.fspath(bad))
    inventory["all"]["hosts"] = {"hostbad": host}
    inventory["all"]["vars"]["mbrescue_output_dir"] = os.fspath(tmp_path / "out")
    path = tmp_path / "inventory.yml"
    path.write_text(json.dumps(inventory))
    result = playbook(tmp_path, path)
    assert result.returncode != 0
    assert recap(result)["hostbad"]["failed"] == 1
    assert re.search(r"mbrescue check failed on hostbad \(exit 2\): mbrescue: error: ",
                     result.stdout), result.stdout[-3000:]
    assert not (tmp_path / "out" / "iso" / "hostbad-rescue.iso").exists()


def test_two_hosts_with_one_name_fail_before_any_capture(fleet, tmp_path):
    # Two inventory hosts given one mbrescue_hostname would share (and replace) one ISO.
    inventory = json.loads(fleet.inventory.read_text())
    inventory["all"]["hosts"] = {
        twin: dict(inventory["all"]["hosts"][host], mbrescue_hostname="twin",
                   mbrescue_host_capture_path=os.fspath(tmp_path / twin / "host.mbrescue"))
        for twin, host in (("twin1", "hostA"), ("twin2", "hostB"))}
    inventory["all"]["vars"]["mbrescue_output_dir"] = os.fspath(tmp_path / "out")
    path = tmp_path / "inventory.yml"
    path.write_text(json.dumps(inventory))
    result = playbook(tmp_path, path)
    assert result.returncode != 0
    counts = recap(result)
    assert counts["twin1"]["failed"] == 1 and counts["twin2"]["failed"] == 1, counts
    fatal = [line for line in result.stdout.splitlines() if line.startswith("fatal:")]
    assert len(fatal) == 2, fatal
    assert all("each host needs its own" in line for line in fatal), fatal
    assert not (tmp_path / "twin1").exists() and not (tmp_path / "twin2").exists()
    assert not list((tmp_path / "out" / "iso").iterdir())


def test_boot_disk_found_by_the_shell(fixtures, tmp_path):
    # The role's own script, in a private mount namespace where fixture A's /boot partition
    # (a loop device over an image copy) is mounted at /boot: it names the image file.
    tasks = yaml.safe_load((ANSIBLE_DIR / "roles/mbrescue/tasks/host.yml").read_text())
    script = next(t for t in tasks if t["name"] == "Find the disk holding /boot")
    image = tmp_path / "disk.img"
    sh("cp", "--sparse=always", fixtures["A"].path, image)
    offset, size = _boot_partition(image, fixtures["A"].boot_partition)
    loop = sh("losetup", "--find", "--show", "-o", str(offset), "--sizelimit", str(size),
              image).strip()
    try:
        found = sh("unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount "$1" /boot && sh -c "$2"', "sh", loop,
                   script["ansible.builtin.raw"])
    finally:
        sh("losetup", "-d", loop)
    assert found.strip() == os.fspath(image)


def test_generations_rotate(tmp_path):
    path = ANSIBLE_DIR / "roles/mbrescue/action_plugins/mbrescue_transfer.py"
    spec = importlib.util.spec_from_file_location("mbrescue_transfer", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dest = tmp_path / "h.mbrescue"
    for generation in range(5):
        module._rotate(os.fspath(dest), 3)
        dest.write_text(str(generation))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.mbrescue", "h.mbrescue.1",
                                                          "h.mbrescue.2"]
    assert [Path(f"{dest}{s}").read_text() for s in ("", ".1", ".2")] == ["4", "3", "2"]
    module._rotate(os.fspath(dest), 1)  # fewer generations: the older ones go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.mbrescue"]


def test_ansible_lint_is_clean(tmp_path):
    assert shutil.which("ansible-lint", path=os.fspath(VENV_BIN))
    result = subprocess.run(
        [os.fspath(VENV_BIN / "ansible-lint"), "--offline", "--nocolor", "rescue.yml", "recover.yml",
         "roles/mbrescue"],
        cwd=ANSIBLE_DIR, env=_environment(tmp_path), text=True, capture_output=True,
        stdin=subprocess.DEVNULL, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
