"""`mbrescue-host refresh`: what mbrescue-refresh.service runs — capture again when /boot drifted.

Standard library only: it runs inside the host bundle. One run reads
`/etc/mbrescue/host.conf`, holds the newest capture of the capture directory against the
live boot disk with `check`, and captures only when something drifted, when there is no
readable capture yet, or when the newest one no longer verifies (`check` reads the
manifest only; the daily run also hashes the whole capture, which costs a read of it).
Captures are named `HOST-YYYYmmddTHHMMSSZ.mbrescue` (UTC) and are written by `capture`
itself (temporary name, then rename), so a half-written capture never carries a
generation's name. The new capture is read back and verified before anything older is
pruned; the last `keep` generations stay, and the newest capture that verifies is never
removed, even when newer ones are damaged. Then the optional `after_capture` command runs
with the new capture's path (an argument list, never a shell string). `--force` captures
without asking `check` (a new generation even when the newest still matches).

`after_capture` is what gets a capture off the host; a capture left on the disk that dies
with it rescues nothing. So a failed copy is not forgotten: the run writes
`HOST.after-capture-pending.json` beside the captures (atomically, mode 0600: which
capture, how many attempts, since when, the last error), and every later run retries the
copy of the newest capture — also when nothing needs capturing — and reports it, until a copy
succeeds and the file is removed. A new capture supersedes a pending one (the newest is what
must leave). A state file that cannot be read means "not known to have left": retried.

Each run prints one line (the journal keeps it): on stdout when the status is 0, else one
`mbrescue: error:` line on stderr. Exit status, `check`'s and `refresh`'s in one table:

    | exit | check CAPTURE [SOURCE]         | refresh (what mbrescue-refresh.service runs)         |
    | ---- | ------------------------------ | ---------------------------------------------------- |
    | 0    | the capture matches            | current, or captured; after_capture (if set) ran,    |
    |      |                                | a pending copy included                              |
    | 1    | drifted: a line per difference | nothing could be checked or captured (older kept)    |
    | 2    | error: one `mbrescue: error:`  | usage error: a bad option or argument                |
    | 3    | (not used)                     | after_capture failed, on a new capture or a pending  |
    |      |                                | copy; retried at every run until it succeeds         |

When `install` runs the first refresh, a failed one is its exit status too (install.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import io
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import capfile, check, debuglog
from .console import printable
from .errors import MbrescueError
from .outputs import check_hostname, write_output

CONFIG_PATH = "/etc/mbrescue/host.conf"
EXIT_OK, EXIT_FAILED, EXIT_AFTER_CAPTURE_FAILED = 0, 1, 3
# An after_capture command (a copy to the build server) that hangs must not hold the
# service for ever: the capture is kept, the run fails with status 3.
AFTER_CAPTURE_TIMEOUT_S = 600
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
STAMP_RE = r"\d{8}T\d{6}Z"
CAPTURE_SUFFIX = ".mbrescue"
PLACEHOLDER = "{capture}"
PENDING_SUFFIX = ".after-capture-pending.json"
PENDING_FORMAT = "mbrescue-after-capture-pending"
PENDING_MAX_BYTES = 64 * 1024

DEFAULT_CONFIG = """\
# mbrescue host side: the settings of `mbrescue-host refresh`, which
# mbrescue-refresh.service runs daily and after each kernel install or removal.
# Lines are KEY = VALUE; lines starting with '#' are comments.

# Where captures go. Never under /boot: /boot is frozen while it is read.
capture_dir = /var/lib/mbrescue

# How many captures (generations) to keep. The newest capture that verifies is
# never removed.
keep = 3

# The boot disk: auto (the disk holding the mounted /boot) or a device, e.g. /dev/sda.
source = auto

# The partition holding /boot: auto (guessed, as `capture` does) or its number.
boot_partition = auto

# The host name recorded in the capture and used in its file name: auto (this
# host's name) or a name.
hostname = auto

# A command run after each new capture, e.g. to copy it to the build server: a JSON
# array of arguments, run without a shell. An element "{capture}" is replaced by the
# new capture's path; without one the path is appended as the last argument.
# Example: after_capture = ["scp", "-q", "{capture}", "backup@build:/srv/mbrescue/"]
after_capture =
"""


@dataclass(frozen=True)
class HostConfig:
    capture_dir: str
    keep: int
    source: str | None  # None: the disk holding /boot
    boot_partition: int | None
    hostname: str | None
    after_capture: tuple[str, ...] | None


def _under_boot(path: str) -> bool:
    for candidate in {os.path.normpath(path), os.path.realpath(path)}:
        if candidate == "/boot" or candidate.startswith("/boot/"):
            return True
    return False


def parse_config(text: str, where: str = CONFIG_PATH) -> HostConfig:
    """host.conf's text as a checked HostConfig; a bad line fails naming the line."""
    values: dict[str, str] = {}
    known = ("capture_dir", "keep", "source", "boot_partition", "hostname", "after_capture")
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, equals, value = line.partition("=")
        key = key.strip()
        if not equals or key not in known:
            raise MbrescueError(f"{where}:{number}: not a setting of host.conf: {line[:60]!r}",
                                hint="settings: " + ", ".join(known))
        if key in values:
            raise MbrescueError(f"{where}:{number}: {key} is set twice")
        values[key] = value.strip()

    capture_dir = values.get("capture_dir") or "/var/lib/mbrescue"
    if not os.path.isabs(capture_dir):
        raise MbrescueError(f"{where}: capture_dir must be an absolute path, not {capture_dir!r}")
    if _under_boot(capture_dir):
        raise MbrescueError(f"{where}: capture_dir {capture_dir} is under /boot, which is frozen "
                            "while it is captured: choose a directory outside /boot")
    keep_text = values.get("keep") or "3"
    if not keep_text.isdigit() or not 1 <= int(keep_text) <= 1000:
        raise MbrescueError(f"{where}: keep must be a whole number from 1 to 1000, "
                            f"not {keep_text!r}")
    source = values.get("source") or "auto"
    if source != "auto" and not os.path.isabs(source):
        raise MbrescueError(f"{where}: source must be auto or an absolute path, not {source!r}")
    partition_text = values.get("boot_partition") or "auto"
    if partition_text != "auto" and not (partition_text.isdigit() and int(partition_text) >= 1):
        raise MbrescueError(f"{where}: boot_partition must be auto or a partition number, "
                            f"not {partition_text!r}")
    hostname = values.get("hostname") or "auto"
    if hostname != "auto":
        try:
            check_hostname(hostname)
        except MbrescueError as exc:
            raise MbrescueError(f"{where}: hostname: {exc}") from None
    return HostConfig(
        capture_dir=os.path.normpath(capture_dir),
        keep=int(keep_text),
        source=None if source == "auto" else source,
        boot_partition=None if partition_text == "auto" else int(partition_text),
        hostname=None if hostname == "auto" else hostname,
        after_capture=_parse_command(values.get("after_capture") or "", where),
    )


def _parse_command(text: str, where: str) -> tuple[str, ...] | None:
    if not text:
        return None
    try:
        argv = json.loads(text)
    except ValueError:
        argv = None
    if not isinstance(argv, list) or not argv or not all(
            isinstance(item, str) and item for item in argv):
        raise MbrescueError(f"{where}: after_capture must be a JSON array of non-empty strings, "
                            'e.g. ["scp", "{capture}", "build:/srv/mbrescue/"] (no shell)')
    return tuple(argv)


def read_config(path: str = CONFIG_PATH) -> HostConfig:
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except FileNotFoundError:
        raise MbrescueError(f"{path}: no such file",
                            hint="install the host side with `mbrescue-host install`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MbrescueError(f"cannot read {path}: {exc}") from None
    return parse_config(text, path)


# ---- generations ----------------------------------------------------------------------------


def generations(capture_dir: str, hostname: str) -> list[str]:
    """This host's captures in capture_dir, oldest first (the stamp in the name orders them)."""
    pattern = re.compile(re.escape(hostname) + "-(" + STAMP_RE + ")" + re.escape(CAPTURE_SUFFIX))
    try:
        names = os.listdir(capture_dir)
    except FileNotFoundError:
        return []
    found = sorted((match.group(1), name) for name in names
                   if (match := pattern.fullmatch(name)) is not None)
    return [os.path.join(capture_dir, name) for _, name in found]


def is_good(path: str) -> bool:
    """The capture opens and every checksum it records holds."""
    try:
        with capfile.Capture.open(path) as capture:
            capture.verify()
            capture.verify_members()
        return True
    except (MbrescueError, OSError):
        return False


def prune(capture_dir: str, hostname: str, keep: int, newest_good: str | None = None) -> list[str]:
    """Remove all but the last `keep` generations, never the newest one that verifies."""
    kept = generations(capture_dir, hostname)
    old = kept[:-keep]
    if not old:
        return []
    if newest_good is None:
        newest_good = next((path for path in reversed(kept) if is_good(path)), None)
    removed = []
    for path in old:
        if path == newest_good:
            continue
        os.unlink(path)
        removed.append(path)
    return removed


def _new_name(capture_dir: str, hostname: str) -> str:
    """A generation name that no file has yet (the stamp has one-second steps)."""
    for _ in range(5):
        stamp = datetime.datetime.now(datetime.UTC).strftime(STAMP_FORMAT)
        path = os.path.join(capture_dir, f"{hostname}-{stamp}{CAPTURE_SUFFIX}")
        if not os.path.lexists(path):
            return path
        time.sleep(1.05 - time.time() % 1)
    raise MbrescueError(f"{path} exists already and the clock does not move on")


# ---- one run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefreshResult:
    status: int
    line: str
    capture: str | None  # the capture written by this run
    current: str | None = None  # the newest capture that verifies, after this run


def _capture(config: HostConfig, hostname: str, output: str) -> list[str]:
    """Capture into output; the capture's own messages, returned (only warnings are shown)."""
    from ..capture import CaptureOptions, capture

    source = config.source or check.default_source()
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        capture(CaptureOptions(source=Path(source), output=Path(output),
                               boot_partition=config.boot_partition, hostname=hostname,
                               progress=False))
    return [line for line in said.getvalue().splitlines() if "warning" in line]


def _why(report: check.CheckReport) -> str:
    first = "; ".join(d.line for d in report.differences[:3])
    more = f"; and {len(report.differences) - 3} more" if len(report.differences) > 3 else ""
    return f"drifted ({len(report.differences)} difference(s): {first}{more})"


def _after_capture(argv: tuple[str, ...], path: str) -> str | None:
    """Run the after_capture command; None when it succeeded, else why not."""
    command = [path if item == PLACEHOLDER else item for item in argv]
    if PLACEHOLDER not in argv:
        command.append(path)
    debuglog.command(command)
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              errors="replace", timeout=AFTER_CAPTURE_TIMEOUT_S, check=False)
    except FileNotFoundError:
        return f"after_capture: {command[0]}: no such program"
    except subprocess.TimeoutExpired:
        return f"after_capture: {command[0]} still running after {AFTER_CAPTURE_TIMEOUT_S} s"
    except OSError as exc:
        return f"after_capture: {command[0]}: {exc.strerror}"
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or ["(no message)"])[-1][:200]
        return f"after_capture: {command[0]} exited with status {done.returncode}: {said}"
    return None


# ---- a copy that has not left the host yet ---------------------------------------------------


@dataclass(frozen=True)
class Pending:
    """What HOST.after-capture-pending.json says: after_capture failed for this capture."""
    capture: str | None  # the capture's file name; None: the state file was unreadable
    attempts: int
    since: str  # when the first attempt failed (UTC, ISO 8601)
    error: str  # the last failure, or why the state file could not be read


def pending_name(hostname: str) -> str:
    return f"{hostname}{PENDING_SUFFIX}"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace(
        "+00:00", "Z")


def read_pending(capture_dir: str, hostname: str) -> Pending | None:
    """The pending copy, parsed once; None when every capture made has left the host.
    A state file that cannot be read says a copy failed and not which: the newest is retried."""
    where = os.path.join(capture_dir, pending_name(hostname))
    try:
        fd = os.open(where, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return Pending(None, 0, "?", f"{os.path.basename(where)} is unreadable ({exc.strerror})")
    try:
        with os.fdopen(fd, "rb") as stream:
            if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                raise ValueError("not a regular file")
            data = json.loads(stream.read(PENDING_MAX_BYTES + 1)[:PENDING_MAX_BYTES])
        if not isinstance(data, dict) or data.get("format") != PENDING_FORMAT:
            raise ValueError("format")
        capture, attempts = data["capture"], data["attempts"]
        since, error = data["since"], data["error"]
        pattern = re.escape(hostname) + "-" + STAMP_RE + re.escape(CAPTURE_SUFFIX)
        if not isinstance(capture, str) or re.fullmatch(pattern, capture) is None:
            raise ValueError("capture")
        if type(attempts) is not int or not 1 <= attempts <= 10**9:
            raise ValueError("attempts")
        if not isinstance(since, str) or not isinstance(error, str):
            raise ValueError("since, error")
    except (OSError, ValueError, KeyError) as exc:
        return Pending(None, 0, "?", f"{os.path.basename(where)} is damaged ({exc})")
    return Pending(capture, attempts, since[:40], error[:300])


def _write_pending(capture_dir: str, hostname: str, pending: Pending) -> None:
    body = {"format": PENDING_FORMAT, "capture": pending.capture, "attempts": pending.attempts,
            "since": pending.since, "error": pending.error}
    # Atomic (a temporary name, then rename) and root's alone, like the captures.
    write_output(Path(capture_dir, pending_name(hostname)),
                 (json.dumps(body, indent=1) + "\n").encode("utf-8"), 0o600)


def _clear_pending(capture_dir: str, hostname: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(capture_dir, pending_name(hostname)))


def _ship(config: HostConfig, hostname: str, result: RefreshResult,
          pending: Pending | None) -> RefreshResult:
    """Run after_capture on this run's new capture, or retry the copy an earlier run could
    not make (on the newest capture, which is what must leave the host)."""
    if result.capture is not None:
        target, retry = result.capture, None
    elif pending is not None and result.current is not None:
        target, retry = result.current, pending
    else:
        return result
    name = os.path.basename(target)
    if config.after_capture is None:
        if pending is None:
            return result
        _clear_pending(config.capture_dir, hostname)
        return RefreshResult(result.status, f"{result.line}; after_capture is no longer set: "
                             "forgot its failed copy", result.capture, result.current)
    failed = _after_capture(config.after_capture, target)
    if failed is None:
        _clear_pending(config.capture_dir, hostname)
        if retry is None:
            line = f"{result.line}; ran {config.after_capture[0]}"
            if pending is not None:
                line += " (the failed copy of an older capture is superseded)"
        elif retry.capture is None:
            line = f"{result.line}; after_capture of {name} succeeded (retried: {retry.error})"
        else:
            line = (f"{result.line}; after_capture of {name} succeeded on attempt "
                    f"{retry.attempts + 1} (failing since {retry.since})")
        return RefreshResult(EXIT_OK, line, result.capture, result.current)
    if retry is not None and retry.capture == name:
        now_pending = Pending(name, retry.attempts + 1, retry.since, failed)
    else:
        now_pending = Pending(name, 1, _now(), failed)
    _write_pending(config.capture_dir, hostname, now_pending)
    if retry is None:
        line = f"{result.line}; {failed}"
    else:
        line = (f"{result.line}; after_capture of {name} failed again (attempt "
                f"{now_pending.attempts}, failing since {now_pending.since}): "
                f"{failed.removeprefix('after_capture: ')}")
    return RefreshResult(EXIT_AFTER_CAPTURE_FAILED, f"{line}; retried at the next refresh",
                         result.capture, result.current)


def _still_pending(pending: Pending) -> str:
    if pending.capture is None:
        return f"and after_capture may not have run ({pending.error})"
    return (f"and after_capture of {pending.capture} is still pending ({pending.attempts} "
            f"failed attempt(s) since {pending.since})")


@contextlib.contextmanager
def _locked(capture_dir: str) -> Iterator[None]:
    """One refresh at a time per capture directory (a lock on the directory itself, so
    nothing is left behind; the kernel drops it when the process dies)."""
    try:
        fd = os.open(capture_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MbrescueError(f"capture directory {capture_dir} does not exist",
                            hint="create it, or set capture_dir in host.conf") from None
    except OSError as exc:
        raise MbrescueError(f"cannot open the capture directory {capture_dir}: "
                            f"{exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MbrescueError(f"another refresh is running on {capture_dir}") from None
        yield
    finally:
        os.close(fd)


def _remove_stale_temporaries(capture_dir: str, hostname: str) -> int:
    """A capture killed with SIGKILL (or a power cut) leaves its temporary file behind (and
    so may the write of the pending-copy state)."""
    names = "(?:" + re.escape(hostname) + "-" + STAMP_RE + re.escape(CAPTURE_SUFFIX) + "|" + \
        re.escape(pending_name(hostname)) + ")"
    pattern = re.compile(r"\." + names + r"\.tmp-(\d+)(?:-[0-9a-f]{16})?")
    removed = 0
    for name in os.listdir(capture_dir):
        match = pattern.fullmatch(name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # its writer still runs
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        os.unlink(os.path.join(capture_dir, name))
        removed += 1
    return removed


def host_name(config: HostConfig) -> str:
    """The name in the captures' file names: host.conf's, or this host's."""
    return check_hostname(config.hostname or socket.gethostname())


def refresh(config: HostConfig, force: bool = False) -> RefreshResult:
    """One run: check, capture when needed (always with force), prune, ship."""
    hostname = host_name(config)
    with _locked(config.capture_dir):
        stale = _remove_stale_temporaries(config.capture_dir, hostname)
        pending = read_pending(config.capture_dir, hostname)
        try:
            result = _refresh(config, hostname, force)
        except MbrescueError as exc:
            if pending is None:
                raise
            raise MbrescueError(f"{exc}; {_still_pending(pending)}", hint=exc.hint) from None
        result = _ship(config, hostname, result, pending)
    if stale:
        return RefreshResult(result.status, f"{result.line}; removed {stale} stale temporary "
                             "file(s) of an interrupted capture", result.capture, result.current)
    return result


def _refresh(config: HostConfig, hostname: str, force: bool = False) -> RefreshResult:
    kept = generations(config.capture_dir, hostname)
    if not kept:
        reason = "no capture yet"
    elif force:
        reason = "--force"
    else:
        newest = kept[-1]
        try:
            report = check.check(newest, config.source)
        except MbrescueError as exc:
            try:
                check.load_manifest(newest)
            except MbrescueError:
                reason = f"the newest capture {os.path.basename(newest)} is unreadable ({exc})"
            else:
                raise MbrescueError(f"could not check {newest}: {exc}") from None
        else:
            if report.matches and is_good(newest):
                removed = prune(config.capture_dir, hostname, config.keep, newest_good=newest)
                pruned = f", removed {len(removed)} old" if removed else ""
                return RefreshResult(EXIT_OK, f"{os.path.basename(newest)} still matches "
                                     f"{report.source}; nothing captured{pruned}", None, newest)
            # check reads the manifest only: a capture whose region or files no longer
            # verify (a bad sector, a truncated copy) matches, but would not restore.
            reason = _why(report) if not report.matches else (
                f"the newest capture {os.path.basename(newest)} does not verify")

    output = _new_name(config.capture_dir, hostname)
    try:
        warnings = _capture(config, hostname, output)
    except MbrescueError as exc:
        raise MbrescueError(f"{reason}, but the capture failed: {exc}", hint=exc.hint) from None
    for warning in warnings:
        print(warning, file=sys.stderr)
    if not is_good(output):  # read back what was written before anything older goes
        os.unlink(output)
        raise MbrescueError(f"{reason}, but the new capture {output} did not verify when read "
                            "back: removed it, kept the older ones")
    removed = prune(config.capture_dir, hostname, config.keep, newest_good=output)
    pruned = f", removed {len(removed)} old" if removed else ""
    return RefreshResult(EXIT_OK, f"captured {output} ({reason}){pruned}", output, output)


# ---- the command (host.py) -------------------------------------------------------------------

HELP = ("capture again when /boot drifted from the newest capture (what mbrescue-refresh.service "
        "runs): exit 0 current or captured, 1 could not capture, 3 after_capture failed "
        "(retried at every run until it succeeds)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=CONFIG_PATH, help=f"settings file [{CONFIG_PATH}]")
    parser.add_argument("--force", action="store_true",
                        help="capture even when the newest capture still matches")
    parser.add_argument("--json", action="store_true", dest="as_json",
                        help="also print the result as one JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    result = refresh(read_config(args.config), force=args.force)
    if getattr(args, "as_json", False):
        print(json.dumps({"exit_status": result.status, "line": result.line,
                          "captured": result.capture, "current": result.current}), flush=True)
    if result.status == EXIT_OK:
        print(printable(f"mbrescue: refresh: {result.line}"), flush=True)
    else:
        print(printable(f"mbrescue: error: refresh: {result.line}"), file=sys.stderr, flush=True)
    return result.status
