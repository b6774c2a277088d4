"""`mbrescue-host install/uninstall/refresh`: captures that follow every change of /boot.

Install runs the real host entry (`python -m builder.host`, the module the bundle runs)
into a temporary root holding a copy of this machine's systemd units, so that
`systemd-analyze verify --root` judges the installed units as on a real host. Refresh
runs against a loop-mounted ext4 /boot that gets new "kernels".
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from builder.runner import refresh
from builder.runner.capfile import REGION_MEMBER, Capture

from .conftest import ROOT, mbrescue, one_error_line, sh

MiB = 1 << 20
BOOT_START = 2048
BOOT_BYTES = 16 * MiB
KERNEL = "6.1.0-54-amd64"
INSTALLED = [
    "usr/local/sbin/mbrescue-host",
    "etc/mbrescue/host.conf",
    "etc/mbrescue/installed.json",
    "etc/kernel/postinst.d/zz-mbrescue",
    "etc/kernel/postrm.d/zz-mbrescue",
    "etc/kernel/install.d/95-mbrescue.install",
    "etc/initramfs/post-update.d/zz-mbrescue",
    "etc/systemd/system/mbrescue-refresh.service",
    "etc/systemd/system/mbrescue-refresh.timer",
    "etc/systemd/system/mbrescue-refresh-soon.timer",
]
UNITS = ["mbrescue-refresh.service", "mbrescue-refresh.timer", "mbrescue-refresh-soon.timer"]


def host(*args: str | os.PathLike[str], bundle: Path | None = None,
         timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MBRESCUE_")}
    if bundle is not None:
        env["MBRESCUE_BUNDLE_FILE"] = os.fspath(bundle)
    return subprocess.run([sys.executable, "-m", "builder.host", *map(os.fspath, args)],
                          cwd=ROOT, env=env, text=True, capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def listing(root: Path) -> dict[str, tuple[int, str]]:
    """Every entry under root: mode and content (file hash or link target)."""
    seen = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            what = "-> " + os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = "dir"
        seen[os.fspath(path.relative_to(root))] = (st.st_mode, what)
    return seen


@pytest.fixture
def target(tmp_path) -> tuple[Path, Path]:
    """A root that looks like a Debian host's, and a file standing in for the bundle."""
    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/kernel/postinst.d").mkdir(parents=True)
    (root / "etc/kernel/postinst.d/zz-update-grub").write_text("#!/bin/sh\nexit 0\n")
    (root / "var/lib").mkdir(parents=True)
    bundle = tmp_path / "mbrescue-host.bundle"
    bundle.write_bytes(b"\x7fELF" + os.urandom(64 * 1024))
    return root, bundle


def test_install_verify_uninstall_leaves_the_tree_as_it_was(target):
    root, bundle = target
    before = listing(root)
    done = host("install", "--root", root, bundle=bundle)
    assert done.returncode == 0, done.stderr
    for name in INSTALLED:
        assert (root / name).is_file(), name
    assert (root / "usr/local/sbin/mbrescue-host").read_bytes() == bundle.read_bytes()
    assert os.access(root / "usr/local/sbin/mbrescue-host", os.X_OK)
    assert stat.S_IMODE((root / "var/lib/mbrescue").stat().st_mode) == 0o700
    assert os.readlink(root / "etc/systemd/system/timers.target.wants/mbrescue-refresh.timer") \
        == "/etc/systemd/system/mbrescue-refresh.timer"
    config = refresh.read_config(os.fspath(root / "etc/mbrescue/host.conf"))
    assert (config.capture_dir, config.keep, config.source, config.after_capture) == (
        "/var/lib/mbrescue", 3, None, None)
    recorded = json.loads((root / "etc/mbrescue/installed.json").read_text())
    assert {item["path"] for item in recorded["files"]} == {
        "/" + name for name in INSTALLED if not name.endswith("installed.json")} | {
        "/etc/systemd/system/timers.target.wants/mbrescue-refresh.timer"}

    daily = (root / "etc/systemd/system/mbrescue-refresh.timer").read_text()
    assert "OnCalendar=daily" in daily and "Persistent=true" in daily
    assert "RandomizedDelaySec=" in daily
    assert "OnActiveSec=120s" in (root / "etc/systemd/system/mbrescue-refresh-soon.timer"
                                  ).read_text()
    # systemd judges the units inside the root (ExecStart's program must exist there too).
    unit_paths = [f"/etc/systemd/system/{unit}" for unit in UNITS]
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}",
                             *unit_paths], capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    # ... and it does judge: a unit whose program is missing fails the same verify.
    broken = root / "etc/systemd/system/mbrescue-broken.service"
    broken.write_text((root / "etc/systemd/system/mbrescue-refresh.service").read_text()
                      .replace("/usr/local/sbin/mbrescue-host", "/usr/local/sbin/nowhere"))
    failed = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}",
                             "/etc/systemd/system/mbrescue-broken.service"],
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "nowhere" in failed.stderr
    broken.unlink()

    # The hooks run as run-parts and kernel-install run them: with arguments, without systemd.
    for hook in ("etc/kernel/postinst.d/zz-mbrescue", "etc/kernel/install.d/95-mbrescue.install"):
        ran = subprocess.run([root / hook, "add", "6.1.0-99-amd64", "/boot/vmlinuz-6.1.0-99-amd64"],
                             capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        assert ran.returncode == 0 and "systemd is not running" in ran.stderr, ran.stderr

    again = host("install", "--root", root, bundle=bundle)  # an upgrade in place
    assert again.returncode == 0, again.stderr
    assert "kept" in again.stdout and "host.conf" in again.stdout

    gone = host("uninstall", "--root", root)
    assert gone.returncode == 0, gone.stderr
    assert "note:" not in gone.stdout, gone.stdout
    assert listing(root) == before


def test_edited_files_survive_uninstall_with_a_note(target):
    root, bundle = target
    assert host("install", "--root", root, bundle=bundle).returncode == 0
    conf = root / "etc/mbrescue/host.conf"
    conf.write_text(conf.read_text().replace("keep = 3", "keep = 7"))
    service = root / "etc/systemd/system/mbrescue-refresh.service"
    service.write_text(service.read_text() + "Environment=EDITED=1\n")
    (root / "var/lib/mbrescue/host-20260101T000000Z.mbrescue").write_bytes(b"a capture")
    edited = conf.read_bytes()

    gone = host("uninstall", "--root", root)
    assert gone.returncode == 0, gone.stderr
    notes = [line for line in gone.stdout.splitlines() if "note:" in line]
    assert any(f"kept {conf}: edited since install" in line for line in notes), notes
    assert any(f"kept {service}: its content changed" in line for line in notes), notes
    assert any("var/lib/mbrescue: it is not empty" in line for line in notes), notes
    assert conf.read_bytes() == edited and service.exists()
    for name in INSTALLED:
        if name not in ("etc/mbrescue/host.conf", "etc/systemd/system/mbrescue-refresh.service"):
            assert not (root / name).exists(), name

    again = host("uninstall", "--root", root)
    assert "nothing was installed here" in one_error_line(again)


def test_install_refuses_a_foreign_file_and_needs_the_bundle(target):
    root, bundle = target
    (root / "etc/kernel/postrm.d").mkdir(parents=True)
    (root / "etc/kernel/postrm.d/zz-mbrescue").write_text("#!/bin/sh\n# someone else's\n")
    before = listing(root)
    refused = host("install", "--root", root, bundle=bundle)
    assert "was not laid down by mbrescue" in one_error_line(refused)
    assert listing(root) == before  # checked before the first write
    assert "not one" in one_error_line(host("install", "--root", root))


# ---- idempotency: what the Ansible role's changed_when reads ----------------------------


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry under root: mode, mtime (ns) and content; a rewrite shows in the mtime."""
    seen = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        mode, what = listing_entry(path, st)
        seen[os.fspath(path.relative_to(root))] = (mode, st.st_mtime_ns, what)
    return seen


def listing_entry(path: Path, st: os.stat_result) -> tuple[int, str]:
    if stat.S_ISLNK(st.st_mode):
        return st.st_mode, "-> " + os.readlink(path)
    if stat.S_ISREG(st.st_mode):
        return st.st_mode, hashlib.sha256(path.read_bytes()).hexdigest()
    return st.st_mode, "dir"


def status_line(result: subprocess.CompletedProcess[str]) -> str:
    """install's last stdout line: `mbrescue: install: changed` or `... unchanged`."""
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout.splitlines()[-1]


def changed_entries(before: dict[str, tuple[int, int, str]],
                    after: dict[str, tuple[int, int, str]]) -> set[str]:
    return {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}


def test_a_second_install_changes_nothing_and_says_so(target):
    root, bundle = target
    first = host("install", "--root", root, bundle=bundle)
    assert status_line(first) == "mbrescue: install: changed"
    before = snapshot(root)
    again = host("install", "--root", root, bundle=bundle)
    assert status_line(again) == "mbrescue: install: unchanged", again.stdout
    assert snapshot(root) == before  # no file rewritten: same content, modes and mtimes
    assert "kept" in again.stdout and "host.conf" in again.stdout


def test_a_changed_argument_updates_only_what_differs(target):
    root, bundle = target
    pristine = listing(root)
    assert status_line(host("install", "--root", root, bundle=bundle)) == \
        "mbrescue: install: changed"
    before = snapshot(root)
    moved = host("install", "--root", root, "--capture-dir", "/srv/captures", "--keep", "5",
                 "--hostname", "web1", "--source", "/dev/sdb", bundle=bundle)
    assert status_line(moved) == "mbrescue: install: changed", moved.stdout
    after = snapshot(root)
    # host.conf (rewritten), the record of the install, the new capture directory and the
    # directories whose entries those changed; nothing else.
    assert changed_entries(before, after) == {
        ".", "etc/mbrescue", "etc/mbrescue/host.conf", "etc/mbrescue/installed.json", "srv",
        "srv/captures"}
    config = refresh.read_config(os.fspath(root / "etc/mbrescue/host.conf"))
    assert (config.capture_dir, config.keep, config.hostname, config.source) == (
        "/srv/captures", 5, "web1", "/dev/sdb")
    assert stat.S_IMODE((root / "srv/captures").stat().st_mode) == 0o700
    # The comments of host.conf stay; each setting is set once.
    text = (root / "etc/mbrescue/host.conf").read_text()
    assert text.count("capture_dir =") == 1 and "# Where captures go." in text
    assert status_line(host("install", "--root", root, "--capture-dir", "/srv/captures",
                            "--keep", "5", "--hostname", "web1", "--source", "/dev/sdb",
                            bundle=bundle)) == "mbrescue: install: unchanged"
    # Without the options, host.conf keeps what the last install (or its editor) set.
    assert status_line(host("install", "--root", root, bundle=bundle)) == \
        "mbrescue: install: unchanged"
    assert snapshot(root) == after

    # A new bundle (an upgrade): the program and the record change, nothing else.
    bundle.write_bytes(b"\x7fELF" + os.urandom(64 * 1024))
    upgraded = host("install", "--root", root, bundle=bundle)
    assert status_line(upgraded) == "mbrescue: install: changed"
    assert changed_entries(after, snapshot(root)) == {
        "usr/local/sbin", "usr/local/sbin/mbrescue-host", "etc/mbrescue",
        "etc/mbrescue/installed.json"}
    assert (root / "usr/local/sbin/mbrescue-host").read_bytes() == bundle.read_bytes()

    # A mode changed by hand is put back, without rewriting the file.
    hook = root / "etc/kernel/postrm.d/zz-mbrescue"
    hook.chmod(0o644)
    mtime = hook.stat().st_mtime_ns
    assert status_line(host("install", "--root", root, bundle=bundle)) == \
        "mbrescue: install: changed"
    assert stat.S_IMODE(hook.stat().st_mode) == 0o755 and hook.stat().st_mtime_ns == mtime

    gone = host("uninstall", "--root", root)  # the rewritten host.conf is still install's
    assert gone.returncode == 0 and "note:" not in gone.stdout, gone.stdout
    assert listing(root) == pristine


def test_bad_settings_fail_before_the_first_write(target):
    root, bundle = target
    before = listing(root)
    under_boot = host("install", "--root", root, "--capture-dir", "/boot/captures",
                      bundle=bundle)
    assert "under /boot" in one_error_line(under_boot)
    assert "keep must be" in one_error_line(host("install", "--root", root, "--keep", "0",
                                                 bundle=bundle))
    two_lines = host("install", "--root", root, "--hostname", "a\nkeep = 9", bundle=bundle)
    assert "one line" in one_error_line(two_lines)
    assert listing(root) == before


def test_an_identical_program_already_in_place_is_taken_over(target):
    """The Ansible role copies the bundle to /usr/local/sbin/mbrescue-host and runs its
    install from there: the file install would write is already there, byte for byte."""
    root, bundle = target
    program = root / "usr/local/sbin/mbrescue-host"
    program.parent.mkdir(parents=True)
    shutil.copyfile(bundle, program)
    program.chmod(0o755)
    assert status_line(host("install", "--root", root, bundle=program)) == \
        "mbrescue: install: changed"
    recorded = json.loads((root / "etc/mbrescue/installed.json").read_text())
    assert "/usr/local/sbin/mbrescue-host" in {item["path"] for item in recorded["files"]}
    assert status_line(host("install", "--root", root, bundle=program)) == \
        "mbrescue: install: unchanged"
    # The role pushes a new bundle over it, then runs install again: taken over again.
    program.write_bytes(b"\x7fELF" + os.urandom(64 * 1024))
    assert status_line(host("install", "--root", root, bundle=program)) == \
        "mbrescue: install: changed"
    assert status_line(host("install", "--root", root, bundle=program)) == \
        "mbrescue: install: unchanged"


def test_install_help_names_the_status_line():
    shown = host("install", "--help")
    assert shown.returncode == 0
    flat = " ".join(shown.stdout.split())
    assert "mbrescue: install: unchanged" in flat and "mbrescue: install: changed" in flat
    assert "--capture-dir" in flat and "--root" in flat


# ---- refresh on a loop-mounted /boot -------------------------------------------------------


@pytest.fixture
def boot(tmp_path):
    """An msdos disk image whose ext4 /boot (sector 2048) is loop-mounted at tmp/boot."""
    tree = tmp_path / "tree"
    (tree / "grub").mkdir(parents=True)
    (tree / f"vmlinuz-{KERNEL}").write_bytes(os.urandom(200_000))
    (tree / f"initrd.img-{KERNEL}").write_bytes(os.urandom(300_000))
    (tree / "grub" / "grub.cfg").write_text("set timeout=5\n")
    image = tmp_path / "host.img"
    with open(image, "wb") as stream:
        stream.truncate(24 * MiB)
    sh("sfdisk", "-q", image, input_bytes=b"label: dos\n2048,16MiB,83,*\n,,82\n")
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-L", "boot", "-d", tree, "-E",
       f"offset={BOOT_START * 512}", image, f"{BOOT_BYTES // 1024}k")
    loop = sh("losetup", "-f", "--show", "-o", str(BOOT_START * 512), "--sizelimit",
              str(BOOT_BYTES), image).strip()
    mountpoint = tmp_path / "boot"
    mountpoint.mkdir()
    try:
        sh("mount", loop, mountpoint)
        try:
            yield image, mountpoint
        finally:
            subprocess.run(["fsfreeze", "--unfreeze", mountpoint], capture_output=True)
            sh("umount", mountpoint)
    finally:
        sh("losetup", "-d", loop)


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def write_config(path: Path, **settings: str) -> Path:
    path.write_text("".join(f"{key} = {value}\n" for key, value in settings.items()))
    return path


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "error" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_refresh_captures_on_drift_and_prunes(boot, tmp_path):
    image, mountpoint = boot
    captures = tmp_path / "captures"
    captures.mkdir()
    copied = tmp_path / "copied.mbrescue"
    conf = write_config(tmp_path / "host.conf", capture_dir=os.fspath(captures), keep="2",
                        source=os.fspath(image), hostname="testhost",
                        after_capture=json.dumps(["cp", "{capture}", os.fspath(copied)]))

    first = one_line(host("refresh", "--config", conf))
    made = refresh.generations(os.fspath(captures), "testhost")
    assert len(made) == 1 and "(no capture yet)" in first and made[0] in first
    assert copied.read_bytes() == Path(made[0]).read_bytes()  # after_capture got the path
    assert host("check", made[0], image).returncode == 0

    quiet = one_line(host("refresh", "--config", conf))
    assert "still matches" in quiet and "nothing captured" in quiet
    assert refresh.generations(os.fspath(captures), "testhost") == made

    seen = list(made)
    for number in (58, 59, 60):  # a kernel update each time
        (mountpoint / f"vmlinuz-6.1.0-{number}-amd64").write_bytes(os.urandom(50_000))
        drifted = host("check", seen[-1], image)
        assert drifted.returncode == 1
        assert drifted.stdout.splitlines() == [f"{mountpoint}/vmlinuz-6.1.0-{number}-amd64 added"]
        line = one_line(host("refresh", "--config", conf))
        now = refresh.generations(os.fspath(captures), "testhost")
        assert "drifted (1 difference(s)" in line and f"vmlinuz-6.1.0-{number}-amd64 added" in line
        assert now[-1] not in seen and now[-1] in line
        seen.append(now[-1])
        assert host("check", now[-1], image).returncode == 0
    # keep = 2: the two newest generations, nothing else of this host's in the directory.
    assert refresh.generations(os.fspath(captures), "testhost") == seen[-2:]
    assert sorted(os.listdir(captures)) == sorted(os.path.basename(p) for p in seen[-2:])
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in seen[-2:])


def test_refresh_takes_a_new_capture_when_a_file_level_copy_is_damaged(boot, tmp_path):
    """A capture whose manifest matches but whose file-level copy no longer verifies would
    not restore by the file-level path: refresh captures again (issue 16)."""
    image, _ = boot
    captures = tmp_path / "captures"
    captures.mkdir()
    conf = write_config(tmp_path / "host.conf", capture_dir=os.fspath(captures), keep="2",
                        source=os.fspath(image), hostname="testhost")
    one_line(host("refresh", "--config", conf))
    [first] = refresh.generations(os.fspath(captures), "testhost")
    with Capture.open(first) as opened:
        member = opened.members["files-p1.tar.gz"]
    with open(first, "r+b") as stream:
        stream.seek(member.offset + member.size // 2)
        byte = stream.read(1)
        stream.seek(-1, os.SEEK_CUR)
        stream.write(bytes([byte[0] ^ 0xFF]))
    line = one_line(host("refresh", "--config", conf))
    now = refresh.generations(os.fspath(captures), "testhost")
    assert len(now) == 2 and now[-1] != first and now[-1] in line, line
    assert "files-p1.tar.gz" in line


def test_refresh_json_for_scripts(boot, tmp_path):
    """`refresh --json`: one JSON object on stdout with the exit status and the captures."""
    image, _ = boot
    captures = tmp_path / "captures"
    captures.mkdir()
    conf = write_config(tmp_path / "host.conf", capture_dir=os.fspath(captures), keep="2",
                        source=os.fspath(image), hostname="testhost")
    done = host("refresh", "--config", conf, "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.splitlines()[0])
    assert record["exit_status"] == 0 and record["captured"] == record["current"]
    assert record["captured"] in refresh.generations(os.fspath(captures), "testhost")


def test_refresh_failures_are_one_line_and_keep_what_is_there(boot, tmp_path):
    image, _ = boot
    captures = tmp_path / "captures"
    captures.mkdir()
    bad_source = write_config(tmp_path / "a.conf", capture_dir=os.fspath(captures),
                              source=os.fspath(tmp_path / "no-such.img"), hostname="testhost")
    failed = host("refresh", "--config", bad_source)
    assert failed.returncode == 1
    assert "no capture yet, but the capture failed" in one_error_line(failed)
    assert os.listdir(captures) == []
    fd = os.open(captures, os.O_RDONLY | os.O_DIRECTORY)
    try:  # what a running refresh holds
        fcntl.flock(fd, fcntl.LOCK_EX)
        busy = host("refresh", "--config", bad_source)
        assert busy.returncode == 1 and "another refresh is running" in one_error_line(busy)
    finally:
        os.close(fd)

    under_boot = write_config(tmp_path / "b.conf", capture_dir="/boot/mbrescue")
    assert "under /boot" in one_error_line(host("refresh", "--config", under_boot))
    shell_string = write_config(tmp_path / "c.conf", after_capture="scp $CAPTURE build:")
    assert "JSON array" in one_error_line(host("refresh", "--config", shell_string))

    copy_fails = write_config(tmp_path / "d.conf", capture_dir=os.fspath(captures),
                              source=os.fspath(image), hostname="testhost",
                              after_capture='["false"]')
    gone_pid = _dead_pid()  # a pid that no longer runs, as a SIGKILLed capture's
    stale = captures / f".testhost-20260101T000000Z.mbrescue.tmp-{gone_pid}"
    stale.write_bytes(b"half a capture")
    done = host("refresh", "--config", copy_fails)
    assert done.returncode == 3
    line = one_error_line(done)
    assert "after_capture: false exited with status 1" in line
    assert "removed 1 stale temporary file" in line and not stale.exists()
    kept = refresh.generations(os.fspath(captures), "testhost")
    assert len(kept) == 1 and refresh.is_good(kept[0])


def test_a_newest_capture_that_matches_but_does_not_verify_is_replaced(boot, tmp_path):
    image, _ = boot
    captures = tmp_path / "captures"
    captures.mkdir()
    conf = write_config(tmp_path / "host.conf", capture_dir=os.fspath(captures),
                        source=os.fspath(image), hostname="testhost")
    one_line(host("refresh", "--config", conf))
    (first,) = refresh.generations(os.fspath(captures), "testhost")
    with Capture.open(first) as capture:
        region = capture.members[REGION_MEMBER]
    with open(first, "r+b") as stream:  # one flipped byte inside the region's data
        stream.seek(region.offset + region.size // 2)
        byte = stream.read(1)
        stream.seek(-1, os.SEEK_CUR)
        stream.write(bytes([byte[0] ^ 0xFF]))
    assert host("check", first, image).returncode == 0  # the manifest alone still matches
    line = one_line(host("refresh", "--config", conf))
    assert f"{os.path.basename(first)} does not verify" in line
    kept = refresh.generations(os.fspath(captures), "testhost")
    assert len(kept) == 2 and kept[0] == first and refresh.is_good(kept[1])


def test_prune_never_removes_the_newest_good_capture(boot, tmp_path):
    image, _ = boot
    captures = tmp_path / "captures"
    captures.mkdir()
    good = captures / "testhost-20260101T000000Z.mbrescue"
    made = host("capture", image, "-o", good, "--hostname", "testhost")
    assert made.returncode == 0, made.stderr
    older = captures / "testhost-20250101T000000Z.mbrescue"
    shutil.copyfile(good, older)
    damaged = []
    for stamp in ("20260201T000000Z", "20260301T000000Z"):
        path = captures / f"testhost-{stamp}.mbrescue"
        path.write_bytes(good.read_bytes()[: 40_000])  # cut short, as by a full disk
        damaged.append(path)
    other_host = captures / "otherhost-20200101T000000Z.mbrescue"
    other_host.write_bytes(b"not ours")

    removed = refresh.prune(os.fspath(captures), "testhost", keep=1)
    assert removed == [os.fspath(older), os.fspath(damaged[0])]
    assert sorted(os.listdir(captures)) == sorted(
        [good.name, damaged[1].name, other_host.name])


def test_the_real_bundle_installs_itself_refreshes_and_uninstalls(boot, tmp_path):
    """The bundle copies its own file (MBRESCUE_BUNDLE_FILE from its launcher); the copy runs
    the service's job on the loop-mounted /boot."""
    image, mountpoint = boot
    bundle = tmp_path / "mbrescue-host"
    built = mbrescue("bundle", "-o", bundle)
    assert built.returncode == 0, built.stderr
    root = tmp_path / "root"
    root.mkdir()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    done = subprocess.run([bundle, "install", "--root", root], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    installed = root / "usr/local/sbin/mbrescue-host"
    assert installed.read_bytes() == bundle.read_bytes()

    captures = tmp_path / "captures"
    captures.mkdir()
    conf = write_config(tmp_path / "host.conf", capture_dir=os.fspath(captures),
                        source=os.fspath(image), hostname="testhost")
    for expected in ("(no capture yet)", "still matches"):
        ran = subprocess.run([installed, "refresh", "--config", conf], capture_output=True,
                             text=True, env=env, cwd=tmp_path)
        assert expected in one_line(ran)
    (mountpoint / "vmlinuz-6.1.0-58-amd64").write_bytes(b"a new kernel")
    ran = subprocess.run([installed, "refresh", "--config", conf], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert "vmlinuz-6.1.0-58-amd64 added" in one_line(ran)
    assert len(refresh.generations(os.fspath(captures), "testhost")) == 2

    gone = subprocess.run([installed, "uninstall", "--root", root], capture_output=True,
                          text=True, env=env, cwd=tmp_path)
    assert gone.returncode == 0, gone.stderr
    assert list(root.iterdir()) == []


# ---- what install writes, and where (issue 16) ---------------------------------------------


def test_install_follows_no_absolute_symlink_out_of_the_root(target, tmp_path):
    root, bundle = target
    outside = tmp_path / "outside-etc"
    outside.mkdir()
    shutil.rmtree(root / "etc")
    (root / "etc").symlink_to(outside)  # absolute: the machine's folder, not the tree's
    result = host("install", "--root", root, bundle=bundle)
    assert "out of the tree" in one_error_line(result)
    assert list(outside.iterdir()) == []
    assert not (root / "usr/local/sbin/mbrescue-host").exists()


def test_host_conf_is_roots_alone(target):
    root, bundle = target
    assert host("install", "--root", root, bundle=bundle).returncode == 0
    conf = root / "etc/mbrescue/host.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600


def test_a_capture_dir_anybody_may_write_is_refused(target):
    root, bundle = target
    shared = root / "srv/shared"
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    before = listing(root)
    result = host("install", "--root", root, "--capture-dir", "/srv/shared", bundle=bundle)
    assert "anybody may write" in one_error_line(result)
    assert listing(root) == before


def test_refresh_with_a_fifo_in_the_capture_dir_is_one_line(boot, tmp_path):
    image, _ = boot
    captures = tmp_path / "captures"
    captures.mkdir()
    os.mkfifo(captures / "testhost-20260101T000000Z.mbrescue")
    conf = write_config(tmp_path / "host.conf", capture_dir=os.fspath(captures), keep="2",
                        source=os.fspath(image), hostname="testhost")
    result = host("refresh", "--config", conf, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    assert stat.S_ISFIFO(os.lstat(captures / "testhost-20260101T000000Z.mbrescue").st_mode)


# ---- ISOs that quietly go stale (issue 17, section 2) --------------------------------------


def pending_file(captures: Path, hostname: str = "testhost") -> Path:
    return captures / refresh.pending_name(hostname)


def test_install_says_where_captures_go_and_that_nothing_ships_them(target):
    root, bundle = target
    done = host("install", "--root", root, bundle=bundle)
    assert status_line(done) == "mbrescue: install: changed"
    said = done.stdout + done.stderr
    assert f"captures go to {root}/var/lib/mbrescue" in said, said
    warnings = [line for line in done.stderr.splitlines() if line.startswith("mbrescue: warning:")]
    assert any("nothing ships captures off this host" in line and "after_capture" in line
               for line in warnings), done.stderr
    # Under --root the tree is not this running system: the first capture is not taken
    # here, and install says so and how it will be.
    assert "first capture: not taken under --root" in done.stdout, done.stdout

    conf = root / "etc/mbrescue/host.conf"
    conf.write_text(conf.read_text().replace(
        "after_capture =\n", 'after_capture = ["scp", "-q", "{capture}", "backup@build:/srv/"]\n'))
    again = host("install", "--root", root, bundle=bundle)
    assert status_line(again) == "mbrescue: install: unchanged"
    assert "nothing ships" not in again.stdout + again.stderr
    assert ("after_capture ships each new capture off this host: "
            "scp -q '{capture}' backup@build:/srv/") in again.stdout, again.stdout


def test_install_runs_the_first_refresh_on_request_and_only_once(boot, target):
    image, _ = boot
    root, bundle = target
    base = ("install", "--root", root, "--source", image, "--hostname", "testhost",
            "--capture-dir", "/captures")
    before = listing(root)
    skipped = host(*base, "--no-first-refresh", bundle=bundle)
    assert status_line(skipped) == "mbrescue: install: changed"
    assert "first capture: not taken (--no-first-refresh)" in skipped.stdout, skipped.stdout
    assert refresh.generations(os.fspath(root / "captures"), "testhost") == []

    first = host(*base, "--first-refresh", bundle=bundle)
    assert status_line(first) == "mbrescue: install: changed", first.stdout
    made = refresh.generations(os.fspath(root / "captures"), "testhost")
    assert len(made) == 1 and refresh.is_good(made[0])
    assert f"mbrescue: refresh: captured {made[0]} (no capture yet)" in first.stdout
    # A capture exists now: a second install (Ansible's next run) takes no other one.
    again = host(*base, "--first-refresh", bundle=bundle)
    assert status_line(again) == "mbrescue: install: unchanged", again.stdout
    assert f"newest capture: {os.path.basename(made[0])}" in again.stdout, again.stdout
    assert refresh.generations(os.fspath(root / "captures"), "testhost") == made
    for path in made:
        os.unlink(path)
    assert host("uninstall", "--root", root).returncode == 0
    assert listing(root) == before


def test_a_first_refresh_under_root_needs_a_source(target):
    root, bundle = target
    before = listing(root)
    refused = host("install", "--root", root, "--first-refresh", bundle=bundle)
    assert "--first-refresh under --root needs a source" in one_error_line(refused)
    assert listing(root) == before  # refused before the first write


def test_a_failed_first_refresh_fails_install_but_keeps_what_was_laid_down(target, tmp_path):
    root, bundle = target
    failed = host("install", "--root", root, "--source", tmp_path / "no-such.img",
                  "--hostname", "testhost", "--first-refresh", bundle=bundle)
    assert failed.returncode == 1
    assert "no capture yet, but the capture failed" in one_error_line(failed)
    # What was laid down is true, and said: the status line is still the last one.
    assert failed.stdout.splitlines()[-1] == "mbrescue: install: changed"
    assert (root / "etc/mbrescue/host.conf").is_file()


def test_a_failed_after_capture_is_retried_until_it_succeeds(boot, tmp_path):
    image, _ = boot
    captures = tmp_path / "captures"
    captures.mkdir()
    shipped = tmp_path / "build-server"  # missing: the copy fails until it exists
    conf = write_config(tmp_path / "host.conf", capture_dir=os.fspath(captures),
                        source=os.fspath(image), hostname="testhost",
                        after_capture=json.dumps(["cp", "{capture}", f"{shipped}/"]))
    failed = host("refresh", "--config", conf)
    assert failed.returncode == 3
    assert "after_capture: cp exited with status 1" in one_error_line(failed)
    (made,) = refresh.generations(os.fspath(captures), "testhost")
    state = pending_file(captures)
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert json.loads(state.read_text())["capture"] == os.path.basename(made)

    # The capture still matches, but it never left the host: not "nothing to do".
    for attempt in (2, 3):
        again = host("refresh", "--config", conf)
        assert again.returncode == 3, (again.stdout, again.stderr)
        line = one_error_line(again)
        assert "still matches" in line and "nothing captured" in line, line
        assert (f"after_capture of {os.path.basename(made)} failed again "
                f"(attempt {attempt}") in line, line
        assert "cp exited with status 1" in line
        assert again.stdout == "", again.stdout
        assert refresh.generations(os.fspath(captures), "testhost") == [made]

    # A run that cannot even check still names the copy that has not left.
    no_source = write_config(tmp_path / "gone.conf", capture_dir=os.fspath(captures),
                             source=os.fspath(tmp_path / "no-such.img"), hostname="testhost",
                             after_capture=json.dumps(["cp", "{capture}", f"{shipped}/"]))
    broken = host("refresh", "--config", no_source)
    assert broken.returncode == 1
    assert (f"after_capture of {os.path.basename(made)} is still pending (3 failed attempt(s)"
            in one_error_line(broken))

    shipped.mkdir()
    healed = one_line(host("refresh", "--config", conf))
    assert "still matches" in healed
    assert f"after_capture of {os.path.basename(made)} succeeded on attempt 4" in healed, healed
    assert (shipped / os.path.basename(made)).read_bytes() == Path(made).read_bytes()
    assert not state.exists()
    (shipped / os.path.basename(made)).unlink()
    quiet = one_line(host("refresh", "--config", conf))
    assert "after_capture of" not in quiet and not (shipped / os.path.basename(made)).exists()


def test_a_damaged_pending_state_retries_the_newest_capture(boot, tmp_path):
    image, _ = boot
    captures = tmp_path / "captures"
    captures.mkdir()
    copied = tmp_path / "copied.mbrescue"
    conf = write_config(tmp_path / "host.conf", capture_dir=os.fspath(captures),
                        source=os.fspath(image), hostname="testhost",
                        after_capture=json.dumps(["cp", "{capture}", os.fspath(copied)]))
    one_line(host("refresh", "--config", conf))
    copied.unlink()
    pending_file(captures).write_text("{not json")  # whether it was shipped is unknown
    healed = one_line(host("refresh", "--config", conf))
    assert "after_capture of" in healed and copied.exists(), healed
    assert not pending_file(captures).exists()


def test_refresh_force_captures_although_the_capture_matches(boot, tmp_path):
    image, _ = boot
    captures = tmp_path / "captures"
    captures.mkdir()
    conf = write_config(tmp_path / "host.conf", capture_dir=os.fspath(captures),
                        source=os.fspath(image), hostname="testhost", keep="5")
    one_line(host("refresh", "--config", conf))
    assert "still matches" in one_line(host("refresh", "--config", conf))
    forced = one_line(host("refresh", "--config", conf, "--force"))
    kept = refresh.generations(os.fspath(captures), "testhost")
    assert len(kept) == 2 and kept[-1] in forced and "(--force)" in forced, forced
    assert refresh.is_good(kept[-1])


def test_check_and_refresh_exit_codes_are_one_table():
    """The table in refresh's docstring (what the README copies) says what the code does."""
    from builder.runner import check

    assert refresh.__doc__ is not None
    rows: dict[int, list[str]] = {}
    for line in refresh.__doc__.splitlines():
        if not line.strip().startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0].isdigit():
            rows[int(cells[0])] = cells[1:]
        elif not cells[0] and rows:  # a row's continuation
            last = rows[max(rows)]
            rows[max(rows)] = [f"{a} {b}".strip() for a, b in zip(last, cells[1:], strict=True)]
    assert sorted(rows) == [0, 1, 2, 3], rows
    assert "matches" in rows[check.EXIT_MATCHES][0]
    assert "drifted" in rows[check.EXIT_DRIFTED][0]
    assert "error" in rows[check.EXIT_ERROR][0]
    assert "captured" in rows[refresh.EXIT_OK][1]
    assert "nothing could be" in rows[refresh.EXIT_FAILED][1]
    assert "usage" in rows[2][1]
    assert "after_capture" in rows[refresh.EXIT_AFTER_CAPTURE_FAILED][1]
    assert "retried" in rows[refresh.EXIT_AFTER_CAPTURE_FAILED][1]
    # ... and the codes are what the commands return.
    assert host("refresh", "--no-such-option").returncode == 2
    assert host("check", "/nonexistent.mbrescue").returncode == check.EXIT_ERROR
