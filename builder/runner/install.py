"""`mbrescue-host install` and `uninstall`: captures that follow every change of /boot.

Standard library only: it runs inside the host bundle, which copies itself (the launcher
names its own file in MBRESCUE_BUNDLE_FILE; inside the bundle `sys.executable` is empty).
`install [--root DIR] [--capture-dir D] [--keep N] [--source DISK] [--hostname NAME]`
lays down, under DIR (default /):

- /usr/local/sbin/mbrescue-host: the bundle itself;
- /etc/mbrescue/host.conf: the settings of `refresh`. The options set their settings in it
  (on the line that holds them, comments kept); a setting not given keeps what host.conf
  says, so a file edited by hand is kept as it is unless an option changes one of its lines;
- the kernel hooks: /etc/kernel/postinst.d/zz-mbrescue and /etc/kernel/postrm.d/zz-mbrescue
  (Debian and Ubuntu run them with run-parts after each kernel install and removal),
  /etc/kernel/install.d/95-mbrescue.install (`kernel-install` on RHEL and Fedora), and
  /etc/initramfs/post-update.d/zz-mbrescue (initramfs-tools, after any `update-initramfs`,
  which rewrites an initrd without a kernel install);
- /etc/systemd/system/mbrescue-refresh.service (runs `mbrescue-host refresh`),
  mbrescue-refresh.timer (daily, Persistent=true, so a host that was off catches up,
  RandomizedDelaySec so a fleet does not capture at the same second) and its
  timers.target.wants link, and mbrescue-refresh-soon.timer;
- the capture directory (default /var/lib/mbrescue, mode 0700);
- /etc/mbrescue/installed.json: what was laid down, with each file's SHA-256.

Install is idempotent, for configuration management (the Ansible role): a file that already
holds what install would write is not written again (a wrong mode alone is set with chmod),
the record is rewritten only when what it says changed, and nothing else is touched, so a
second install with the same arguments changes no content, mode or mtime. A file that is
already there byte for byte as install would write it is taken over (the role copies the
bundle to /usr/local/sbin/mbrescue-host, then runs its install from there), and uninstall
removes it like the rest. The last line
of stdout is the machine-readable result, exactly one of:

    mbrescue: install: changed
    mbrescue: install: unchanged

(exit status 0 for both; when install itself fails no such line, one `mbrescue: error:`
line, status 1). On the live root with systemd running, a change is followed by
`systemctl daemon-reload` and the daily timer's start; a timer found inactive is started
and counts as a change.

Then install says where captures go (`captures go to DIR`) and what ships them off the host
(`after_capture ships each new capture off this host: CMD`, or a `mbrescue: warning:
nothing ships captures off this host` line on stderr: a capture left on the disk that dies
rescues nothing), warns of a copy that refresh has not managed yet, and takes the first
capture: when this host has no capture yet, it runs `refresh` at once (`--first-refresh`,
the default on the live root) instead of leaving the host unprotected until the daily
timer's first run, up to a day later. Under `--root` the tree is not the running system,
so the default there is `--no-first-refresh`; `--first-refresh` under `--root` captures
the tree's own `source` (it must be named) into the tree's capture directory. Once a
capture exists install takes none (a second install stays `unchanged`). A first refresh
that fails is one `mbrescue: error: first refresh: …` line; the status line still ends
stdout (what was laid down is true) and the exit status is the refresh's (1 or 3, the
table in refresh.py), so configuration management sees an unprotected host fail.

Why a timer for the hooks: a hook runs in the middle of a package transaction, while the
initrd may still be rebuilt by the next hook and GRUB's menu not yet updated. So a hook
never captures; it runs `systemctl restart --no-block mbrescue-refresh-soon.timer` and
returns at once. That timer (OnActiveSec=2min) starts mbrescue-refresh.service two minutes
after its last restart, and every hook call restarts it: the capture runs once /boot has
been quiet for two minutes, once per transaction, however many kernels it touched. Chosen
over `systemd-run --on-active`, whose transient unit names clash when hooks come fast
and which `systemd-analyze verify` cannot check. Without systemd running (a chroot, an
image build) the hook says so in one line and succeeds: a kernel install never fails
because of mbrescue.

`uninstall [--root DIR]` removes what installed.json names and nothing else: a file whose
content changed since install is kept with one line saying so (an edited host.conf is
the usual case), a directory only if install created it and it is empty (the capture
directory with captures in it stays).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import shlex
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import __version__, debuglog, refresh
from .console import printable
from .errors import MbrescueError
from .outputs import copy_output, write_output

BUNDLE_FILE_ENV = "MBRESCUE_BUNDLE_FILE"
PROGRAM = "/usr/local/sbin/mbrescue-host"
CONFIG = refresh.CONFIG_PATH
CONFIG_MODE = 0o600
MANIFEST = "/etc/mbrescue/installed.json"
MANIFEST_FORMAT = "mbrescue-installed"
UNIT_DIR = "/etc/systemd/system"
SERVICE = "mbrescue-refresh.service"
DAILY_TIMER = "mbrescue-refresh.timer"
SOON_TIMER = "mbrescue-refresh-soon.timer"
QUIET_SECONDS = 120
HOOKS = (
    "/etc/kernel/postinst.d/zz-mbrescue",
    "/etc/kernel/postrm.d/zz-mbrescue",
    "/etc/kernel/install.d/95-mbrescue.install",
    "/etc/initramfs/post-update.d/zz-mbrescue",
)
WANTS_LINK = f"{UNIT_DIR}/timers.target.wants/{DAILY_TIMER}"
# Uninstall removes only these (and the capture directory, when empty): a damaged or
# edited installed.json cannot make it remove anything else.
KNOWN_FILES = frozenset((PROGRAM, CONFIG, MANIFEST, *HOOKS, WANTS_LINK,
                         *(f"{UNIT_DIR}/{unit}" for unit in (SERVICE, DAILY_TIMER, SOON_TIMER))))

HOOK = f"""\
#!/bin/sh
# mbrescue: a kernel or an initrd was installed or removed, so /boot changed.
# Laid down by `mbrescue-host install`, removed by `mbrescue-host uninstall`.
# This only asks for a capture: {SOON_TIMER} starts {SERVICE}
# once /boot has been quiet for {QUIET_SECONDS // 60} minutes (each call starts the wait again),
# never in the middle of this package transaction. Arguments are ignored.
if [ -d /run/systemd/system ]; then
    systemctl restart --no-block {SOON_TIMER} ||
        echo "mbrescue: warning: could not ask for a new capture: run {PROGRAM} refresh" >&2
else
    echo "mbrescue: systemd is not running: run {PROGRAM} refresh once this update is done" >&2
fi
exit 0
"""

SERVICE_UNIT = f"""\
# Laid down by `mbrescue-host install`; settings in {CONFIG}.
[Unit]
Description=mbrescue: capture the boot disk again if /boot changed since the last capture
After=local-fs.target
RequiresMountsFor=/boot

[Service]
Type=oneshot
ExecStart={PROGRAM} refresh
# Exit 1: nothing could be captured; 3: after_capture failed (retried at each run).
Nice=10
IOSchedulingClass=idle
TimeoutStartSec=1h
"""

DAILY_TIMER_UNIT = f"""\
# Laid down by `mbrescue-host install`.
[Unit]
Description=mbrescue: daily check of the boot disk against its newest capture

[Timer]
OnCalendar=daily
Persistent=true
RandomizedDelaySec=1h
Unit={SERVICE}

[Install]
WantedBy=timers.target
"""

SOON_TIMER_UNIT = f"""\
# Laid down by `mbrescue-host install`; restarted by the kernel hooks.
[Unit]
Description=mbrescue: capture once /boot has been quiet for {QUIET_SECONDS // 60} minutes

[Timer]
OnActiveSec={QUIET_SECONDS}s
AccuracySec=10s
Unit={SERVICE}
"""


@dataclass(frozen=True)
class Item:
    path: str  # absolute, as on the host (not under --root)
    mode: int = 0o644
    text: str | None = None  # file content; None with `link` or `copy_from`
    link: str | None = None  # a symlink's target
    copy_from: str | None = None  # a file copied as it is (the bundle)


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _under(root: str, path: str) -> str:
    """path inside the tree root. Its folders must stay in the tree: an absolute symlink
    there (`etc -> /etc`) names this machine's folder, not the tree's, and install would
    write the machine's files."""
    where = os.path.join(root, path.lstrip("/"))
    top = os.path.realpath(root)
    if top == "/":
        return where
    parent = os.path.realpath(os.path.dirname(where))
    if parent != top and not parent.startswith(top + os.sep):
        raise MbrescueError(f"--root {root}: {os.path.dirname(where)} leads out of the tree "
                            f"(to {parent}); nothing written there")
    return where


def _bundle_file() -> str:
    bundle = os.environ.get(BUNDLE_FILE_ENV)
    if not bundle or not os.path.isfile(bundle):
        raise MbrescueError(
            "install copies the host bundle, and this is not one (or its file is gone)",
            hint="build it with `mbrescue bundle -o mbrescue-host`, then run `./mbrescue-host "
                 "install`")
    return bundle


def _items(bundle: str) -> list[Item]:
    """What install lays down besides host.conf (which it edits) and its record."""
    items = [Item(PROGRAM, 0o755, copy_from=bundle)]
    items += [Item(hook, 0o755, text=HOOK) for hook in HOOKS]
    items += [Item(f"{UNIT_DIR}/{SERVICE}", text=SERVICE_UNIT),
              Item(f"{UNIT_DIR}/{DAILY_TIMER}", text=DAILY_TIMER_UNIT),
              Item(f"{UNIT_DIR}/{SOON_TIMER}", text=SOON_TIMER_UNIT),
              Item(WANTS_LINK, link=f"{UNIT_DIR}/{DAILY_TIMER}")]
    return items


# ---- the record of what was laid down ---------------------------------------------------------


@dataclass(frozen=True)
class Record:
    path: str
    kind: str  # file, symlink
    sha256: str | None
    target: str | None


@dataclass(frozen=True)
class Installed:
    files: tuple[Record, ...]
    directories: tuple[str, ...]  # created by install, parents first


def read_manifest(root: str) -> Installed | None:
    where = _under(root, MANIFEST)
    try:
        with open(where, encoding="utf-8") as stream:
            data = json.load(stream)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise MbrescueError(f"cannot read {where}: {exc}") from None
    try:
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ValueError("format")
        records = []
        for item in data["files"]:
            kind = item["kind"]
            if kind not in ("file", "symlink") or not isinstance(item["path"], str):
                raise ValueError("files")
            digest, target = item.get("sha256"), item.get("target")
            if not isinstance(digest if kind == "file" else target, str):
                raise ValueError("files")
            records.append(Record(item["path"], kind, digest, target))
        directories = tuple(data["directories"])
        if not all(isinstance(d, str) and os.path.isabs(d) for d in directories):
            raise ValueError("directories")
    except (KeyError, TypeError, ValueError) as exc:
        raise MbrescueError(f"{where} is not mbrescue's record of an install (field "
                            f"{str(exc).strip(chr(39))})") from None
    return Installed(tuple(records), directories)


def _manifest_body(records: list[Record], directories: list[str]) -> dict[str, object]:
    return {
        "format": MANIFEST_FORMAT,
        "tool_version": __version__,
        "files": [{"path": r.path, "kind": r.kind, "sha256": r.sha256, "target": r.target}
                  for r in records],
        "directories": directories,
    }


def _write_manifest(root: str, records: list[Record], directories: list[str]) -> bool:
    """Write the record when what it says differs from the one there; whether it did."""
    where = _under(root, MANIFEST)
    body = _manifest_body(records, directories)
    try:
        with open(where, encoding="utf-8") as stream:
            previous = json.load(stream)
    except (OSError, ValueError):
        previous = None
    if isinstance(previous, dict):
        previous.pop("installed", None)  # when it was written is not what it says
        if previous == body:
            return False
    stamp = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    data = {**body, "installed": stamp.replace("+00:00", "Z")}
    _write_text(where, json.dumps(data, indent=1) + "\n", 0o644)
    return True


def _matches(root: str, record: Record) -> bool | None:
    """Is the file still as install left it? None: it is gone."""
    where = _under(root, record.path)
    if not os.path.lexists(where):
        return None
    if record.kind == "symlink":
        return os.path.islink(where) and os.readlink(where) == record.target
    if os.path.islink(where) or not os.path.isfile(where):
        return False
    return _sha256_file(where) == record.sha256


# ---- host.conf ------------------------------------------------------------------------------

# The settings install's options set in host.conf (the option is --capture-dir for capture_dir).
SETTINGS = ("capture_dir", "keep", "source", "hostname")


def set_settings(text: str, settings: dict[str, str]) -> str:
    """host.conf's text with each given setting's value on the line that holds it (a line
    whose value is already that is left as it is); a setting with no line is appended."""
    left = dict(settings)
    lines = []
    for raw in text.splitlines(keepends=True):
        stripped = raw.strip()
        key, equals, value = stripped.partition("=")
        key = key.strip()
        if equals and not stripped.startswith("#") and key in left:
            wanted = left.pop(key)
            if value.strip() != wanted:
                raw = f"{key} = {wanted}\n"
        lines.append(raw)
    if left:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines += [f"{key} = {value}\n" for key, value in left.items()]
    return "".join(lines)


def _read_text(where: str) -> str:
    try:
        with open(where, encoding="utf-8") as stream:
            return stream.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise MbrescueError(f"cannot read {where}: {exc}") from None


# ---- laying files down ----------------------------------------------------------------------


def _write_text(where: str, text: str, mode: int) -> None:
    write_output(Path(where), text.encode("utf-8"), mode)


def _check_capture_dir(where: str) -> None:
    """Captures are written there as root: a folder anybody may write to is refused."""
    try:
        st = os.stat(where)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise MbrescueError(f"--capture-dir {where}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MbrescueError(f"--capture-dir {where}: not a directory")
    if st.st_mode & stat.S_IWOTH:
        raise MbrescueError(f"--capture-dir {where}: anybody may write to it (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}); captures need a folder of "
                            "root's own", hint=f"chmod o-w {where}, or choose another")


def _make_dirs(root: str, path: str, created: list[str]) -> None:
    """Create path's missing parents (0755, the capture directory 0700), noting each."""
    missing = []
    at = os.path.dirname(path)
    while at != "/" and not os.path.isdir(_under(root, at)):
        missing.append(at)
        at = os.path.dirname(at)
    for directory in reversed(missing):
        os.mkdir(_under(root, directory), 0o755)
        if directory not in created:
            created.append(directory)


def _wanted_sha256(item: Item) -> str | None:
    if item.copy_from is not None:
        return _sha256_file(item.copy_from)
    if item.text is not None:
        return hashlib.sha256(item.text.encode("utf-8")).hexdigest()
    return None


def _state(root: str, item: Item, sha256: str | None) -> str:
    """missing; same (nothing to do); mode (content right, mode wrong); differs."""
    where = _under(root, item.path)
    if not os.path.lexists(where):
        return "missing"
    if item.link is not None:
        return "same" if os.path.islink(where) and os.readlink(where) == item.link else "differs"
    if os.path.islink(where) or not os.path.isfile(where) or _sha256_file(where) != sha256:
        return "differs"
    return "same" if stat.S_IMODE(os.stat(where).st_mode) == item.mode else "mode"


def _lay(root: str, item: Item) -> None:
    """Write item in place atomically (a temporary name, then rename)."""
    where = _under(root, item.path)
    tmp = f"{where}.mbrescue-tmp"
    if item.link is not None:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(item.link, tmp)
        os.replace(tmp, where)
    elif item.copy_from is not None:
        copy_output(Path(item.copy_from), Path(where), item.mode)
    else:
        assert item.text is not None
        _write_text(where, item.text, item.mode)


def _record(item: Item, sha256: str | None) -> Record:
    if item.link is not None:
        return Record(item.path, "symlink", None, item.link)
    return Record(item.path, "file", sha256, None)


def _systemd_running(root: str) -> bool:
    return os.path.realpath(root) == "/" and os.path.isdir("/run/systemd/system")


def _systemctl(*args: str) -> None:
    debuglog.command(["systemctl", *args])
    done = subprocess.run(["systemctl", *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        print(f"mbrescue: warning: systemctl {' '.join(args)}: {said}", file=sys.stderr)


def _timer_active() -> bool:
    return subprocess.run(["systemctl", "is-active", "--quiet", DAILY_TIMER],
                          stdin=subprocess.DEVNULL, capture_output=True, check=False
                          ).returncode == 0


@dataclass(frozen=True)
class InstallResult:
    lines: tuple[str, ...]  # what was done, one line each
    changed: bool  # whether anything under root was written, created or chmod-ed
    warnings: tuple[str, ...] = ()
    status: int = 0  # the first refresh's exit status when it failed, else 0
    failure: str | None = None  # the first refresh's error line


def install(root: str = "/", settings: dict[str, str] | None = None,
            first_refresh: bool | None = None) -> InstallResult:
    """Lay the host side down under root, writing only what differs from what is there,
    then say where captures go and what ships them, and take the first capture.

    settings: host.conf settings to set (keys from SETTINGS); the others stay as they are.
    first_refresh: run `refresh` now when this host has no capture yet; None: on the live
    root yes, under another root no (the tree is not the running system)."""
    if not os.path.isdir(root):
        raise MbrescueError(f"--root {root} is not a directory")
    settings = dict(settings or {})
    for key, value in settings.items():
        if key not in SETTINGS:
            raise MbrescueError(f"install cannot set {key} (it sets: {', '.join(SETTINGS)})")
        if "\n" in value or "\r" in value:
            raise MbrescueError(f"--{key.replace('_', '-')} must be one line")
    bundle = _bundle_file()
    previous = read_manifest(root)
    recorded = {r.path: r for r in previous.files} if previous is not None else {}
    items = _items(bundle)
    wanted = {item.path: _wanted_sha256(item) for item in items}
    states = {item.path: _state(root, item, wanted[item.path]) for item in items}
    lines = []
    # Check everything before the first write: a foreign or edited file stops the install.
    # A file that already holds what install would write is install's, whoever put it there.
    for item in items:
        where = _under(root, item.path)
        if states[item.path] != "differs":
            continue
        record = recorded.get(item.path)
        if record is None:
            raise MbrescueError(f"{where} exists and was not laid down by mbrescue: not "
                                "replacing it", hint="move it away, then install again")
        if _matches(root, record) is False:
            raise MbrescueError(f"{where} changed since mbrescue installed it: not replacing it",
                                hint="move it away, then install again")
    config_where = _under(root, CONFIG)
    config_exists = os.path.lexists(config_where)
    old_config = _read_text(config_where) if config_exists else None
    new_config = set_settings(refresh.DEFAULT_CONFIG if old_config is None else old_config,
                              settings)
    config = refresh.parse_config(new_config, config_where)  # a bad setting fails here
    _check_capture_dir(_under(root, config.capture_dir))
    live = os.path.realpath(root) == "/"
    if first_refresh and not live and config.source is None:
        raise MbrescueError("--first-refresh under --root needs a source: source = auto names "
                            "the disk holding this machine's /boot, not the tree's",
                            hint="give --source DISK, the disk that holds the tree's /boot")
    config_record = recorded.get(CONFIG)
    # host.conf stays install's to remove only while it holds what install last wrote.
    config_ours = not config_exists or (
        config_record is not None and _matches(root, config_record) is True)

    changed = False
    created = list(previous.directories) if previous is not None else []
    _make_dirs(root, MANIFEST, created)
    if new_config == old_config:
        lines.append(f"kept {config_where} as it is")
    else:
        # Its commands run as root and its settings name the captures: root's alone.
        _write_text(config_where, new_config, CONFIG_MODE)
        changed = True
        if config_exists:
            lines.append(f"set {', '.join(settings)} in {config_where}")
        else:
            lines.append(f"installed {config_where}")
        if config_ours:
            config_record = Record(CONFIG, "file", _sha256_file(config_where), None)
    records: list[Record] = [config_record] if config_record is not None else []
    for item in items:
        where = _under(root, item.path)
        state = states[item.path]
        if state in ("missing", "differs"):
            _make_dirs(root, item.path, created)
            _lay(root, item)
            lines.append(f"{'installed' if state == 'missing' else 'updated'} {where}")
            changed = True
        elif state == "mode":
            os.chmod(where, item.mode)
            lines.append(f"set mode {item.mode:04o} on {where}")
            changed = True
        records.append(_record(item, wanted[item.path]))
    capture_dir = _under(root, config.capture_dir)
    if not os.path.isdir(capture_dir):
        _make_dirs(root, os.path.join(config.capture_dir, "x"), created)
        os.chmod(capture_dir, 0o700)  # captures hold /boot, which can hold secrets
        lines.append(f"created {capture_dir} (mode 0700)")
        changed = True
    if _write_manifest(root, records, created):
        lines.append(f"recorded what was laid down in {_under(root, MANIFEST)}")
        changed = True
    if _systemd_running(root):
        if changed:
            _systemctl("daemon-reload")
        if changed or not _timer_active():
            _systemctl("start", DAILY_TIMER)
            changed = True
            lines.append(f"started {DAILY_TIMER}; the kernel hooks ask for a capture after "
                         "each kernel update")
    elif changed:
        lines.append(f"systemd is not running here: {DAILY_TIMER} starts at the next boot")
    return _first_refresh(root, config, config_where, live, first_refresh,
                          InstallResult(tuple(lines), changed))


def _first_refresh(root: str, config: refresh.HostConfig, config_where: str, live: bool,
                   asked: bool | None, laid: InstallResult) -> InstallResult:
    """Say where captures go and what ships them off the host, then take the first capture
    (when wanted and there is none yet): a host is protected from now, not from the daily
    timer's first run up to a day later."""
    capture_dir = _under(root, config.capture_dir)
    lines = [*laid.lines, f"captures go to {capture_dir} (the newest {config.keep} kept)"]
    warnings = []
    if config.after_capture is not None:
        lines.append("after_capture ships each new capture off this host: "
                     + shlex.join(config.after_capture))
    else:
        warnings.append(
            f"nothing ships captures off this host: after_capture is empty in {config_where}, "
            "and a capture on the disk that dies rescues nothing; set it (e.g. after_capture = "
            '["scp", "-q", "{capture}", "backup@build:/srv/mbrescue/"]) or fetch the captures '
            "from the build machine")
    hostname = refresh.host_name(config)
    pending = refresh.read_pending(capture_dir, hostname)
    if pending is not None:
        what = pending.capture or "the newest capture"
        warnings.append(f"after_capture of {what} has not succeeded yet ({pending.error}); "
                        "every refresh retries it")
    kept = refresh.generations(capture_dir, hostname)
    if kept:
        lines.append(f"newest capture: {os.path.basename(kept[-1])}; the timer and the kernel "
                     "hooks keep it current")
        return InstallResult(tuple(lines), laid.changed, tuple(warnings))
    if not (live if asked is None else asked):
        why = "(--no-first-refresh)" if asked is False else (
            "under --root (the tree is not this running system; --first-refresh takes it "
            "from its source)")
        lines.append(f"first capture: not taken {why}: run `{PROGRAM} refresh` there, or "
                     f"{DAILY_TIMER} takes it within a day")
        return InstallResult(tuple(lines), laid.changed, tuple(warnings))
    try:
        result = refresh.refresh(dataclasses.replace(config, capture_dir=capture_dir))
    except MbrescueError as exc:
        hint = f" (hint: {exc.hint})" if exc.hint else ""
        return InstallResult(tuple(lines), laid.changed, tuple(warnings), refresh.EXIT_FAILED,
                             f"first refresh: {str(exc).splitlines()[0]}{hint}")
    changed = laid.changed or result.capture is not None
    if result.status != refresh.EXIT_OK:
        return InstallResult(tuple(lines), changed, tuple(warnings), result.status,
                             f"first refresh: {result.line}")
    return InstallResult((*lines, f"refresh: {result.line}"), changed, tuple(warnings))


def uninstall(root: str = "/") -> list[str]:
    """Remove what install laid down, keeping what changed since; the lines to print."""
    installed = read_manifest(root)
    if installed is None:
        raise MbrescueError(f"{_under(root, MANIFEST)} does not exist: nothing was installed "
                            "here (or it was removed by hand)")
    lines = []
    if _systemd_running(root):
        _systemctl("stop", DAILY_TIMER, SOON_TIMER)
    for record in installed.files:
        where = _under(root, record.path)
        if record.path not in KNOWN_FILES or record.path == MANIFEST:
            lines.append(f"note: left {where}: not a file mbrescue lays down")
            continue
        state = _matches(root, record)
        if state is None:
            lines.append(f"note: {where} was already gone")
        elif state is False:
            why = ("edited since install (remove it by hand if unwanted)"
                   if record.path == CONFIG else "its content changed since install")
            lines.append(f"note: kept {where}: {why}")
        else:
            os.unlink(where)
            lines.append(f"removed {where}")
    os.unlink(_under(root, MANIFEST))
    kept: list[str] = []
    for directory in reversed(installed.directories):
        where = _under(root, directory)
        try:
            os.rmdir(where)
        except FileNotFoundError:
            continue
        except OSError:
            if not any(inner.startswith(directory + "/") for inner in kept):
                left = len(os.listdir(where)) if os.path.isdir(where) else 0
                lines.append(f"note: kept {where}: it is not empty ({left} entries)")
            kept.append(directory)
    if _systemd_running(root):
        _systemctl("daemon-reload")
    return lines


# ---- the commands (host.py) ------------------------------------------------------------------

INSTALL_HELP = ("install the host side: this bundle, host.conf, kernel hooks and a systemd "
                "timer that capture again after every change of /boot")
UNINSTALL_HELP = "remove exactly what install laid down (files changed since are kept)"
CHANGED_LINE = "mbrescue: install: changed"
UNCHANGED_LINE = "mbrescue: install: unchanged"
INSTALL_EPILOG = (f"Idempotent: only what differs is written. The last line of stdout is "
                  f"'{CHANGED_LINE}' or '{UNCHANGED_LINE}' (exit status 0 for both). "
                  "Settings not given keep what host.conf says.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default="/", metavar="DIR",
                        help="install into this directory as the root file system [/]")


def add_install_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)
    parser.epilog = INSTALL_EPILOG
    parser.add_argument("--capture-dir", dest="capture_dir", default=None, metavar="DIR",
                        help="set host.conf's capture_dir: where captures go, outside /boot")
    parser.add_argument("--keep", default=None, metavar="N",
                        help="set host.conf's keep: how many captures to keep")
    parser.add_argument("--source", default=None, metavar="DISK",
                        help="set host.conf's source: the boot disk, or auto")
    parser.add_argument("--hostname", default=None, metavar="NAME",
                        help="set host.conf's hostname: the name recorded, or auto")
    parser.add_argument("--first-refresh", dest="first_refresh",
                        action=argparse.BooleanOptionalAction, default=None,
                        help="run `refresh` now when this host has no capture yet, so it is "
                             "protected at once [yes on the live root, no under --root; "
                             "under --root it needs --source]")


def run_install(args: argparse.Namespace) -> int:
    settings = {key: getattr(args, key) for key in SETTINGS if getattr(args, key) is not None}
    result = install(args.root, settings, args.first_refresh)
    for line in result.lines:
        print(printable(f"mbrescue: {line}"))
    for warning in result.warnings:
        print(printable(f"mbrescue: warning: {warning}"), file=sys.stderr)
    if result.failure is not None:
        print(printable(f"mbrescue: error: {result.failure}"), file=sys.stderr)
    # What was laid down is true even when the first refresh failed: the status line stays
    # the last line of stdout, and the exit status is the refresh's.
    print(CHANGED_LINE if result.changed else UNCHANGED_LINE, flush=True)
    return result.status


def run_uninstall(args: argparse.Namespace) -> int:
    for line in uninstall(args.root):
        print(f"mbrescue: {line}")
    return 0
