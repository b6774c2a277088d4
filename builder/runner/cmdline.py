"""The kernel command line switches an administrator gives the rescue system.

- `mbrescue.target=<serial, WWN or /dev path>` preselects the disk to restore onto.
- `mbrescue.unattended=1` restores without asking — DANGEROUS: honoured only when the
  rescue system was built with the explicit opt-in (`/mbrescue/options.json` holding
  `{"unattended_allowed": true}`) and only onto an identified disk: the one named by
  `mbrescue.target=`, or the one with the captured serial/WWN. A lone disk that is merely
  large enough is not identified, so the runner asks.
- `mbrescue.medium=<ID>` names the medium the rescue system booted from (the ISO's
  volume set or application id, a serial or a /dev path): it is never offered as a target.
  It is not needed for safety: every mbrescue rescue medium is refused by its ISO 9660
  volume descriptor (targets.py), this switch only adds a serial or path match.

- `mbrescue.files=1` takes the file-level path (a new table in the disk's own geometry, the
  file systems made again, the captured files unpacked: files_restore.py) on every disk, even
  one the region path could take — as `mbrescue restore --files` does. Without it the path is
  chosen per disk: the region path where the disk has the captured logical sector size and
  holds the region, the file-level path elsewhere (a 4Kn disk, a smaller disk).

Values may be double-quoted, as the kernel allows (`mbrescue.target="WD 123"`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .errors import MbrescueError

PROC_CMDLINE = "/proc/cmdline"
OPTIONS_PATH = "/mbrescue/options.json"
# Written by the runner when a restore went on without a person (mbrescue.unattended=1,
# honoured): /init then reboots into the restored disk by itself after a countdown.
UNATTENDED_DONE_PATH = "/run/mbrescue-unattended"
TRUE_WORDS = ("1", "yes", "true", "on")


@dataclass(frozen=True)
class Switches:
    target: str | None = None
    unattended: bool = False
    medium: str | None = None
    files: bool = False


def split_cmdline(text: str) -> list[str]:
    """Words of a kernel command line; double quotes group, as in the kernel's own parser."""
    words: list[str] = []
    current: list[str] = []
    quoted = in_word = False
    for char in text.strip():
        if char == '"':
            quoted = not quoted
            in_word = True
        elif char.isspace() and not quoted:
            if in_word:
                words.append("".join(current))
            current, in_word = [], False
        else:
            current.append(char)
            in_word = True
    if in_word:
        words.append("".join(current))
    return words


def parse_switches(text: str) -> Switches:
    values: dict[str, str] = {}
    for word in split_cmdline(text):
        key, _, value = word.partition("=")
        if key.startswith("mbrescue."):
            # The last occurrence wins, like most kernel parameters.
            values[key[len("mbrescue.") :]] = value
    return Switches(
        target=values.get("target") or None,
        unattended=values.get("unattended", "").lower() in TRUE_WORDS,
        medium=values.get("medium") or None,
        files=values.get("files", "").lower() in TRUE_WORDS,
    )


def read_switches(path: str = PROC_CMDLINE) -> Switches:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return parse_switches(handle.read())
    except FileNotFoundError:
        return Switches()


def options_json(unattended: bool, capture_sha256: str, manifest_sha256: str,
                 encrypted_capture_sha256: str | None = None) -> bytes:
    """The build's options file, as the readers below take it (ISO and network boot).

    An encrypted build (`build --encrypt`) says so and names the encrypted file's SHA-256
    apart: `capture_sha256` and `manifest_sha256` stay the plain capture's, which the
    rescue system checks after decrypting it."""
    options: dict[str, object] = {"unattended_allowed": unattended,
                                  "capture_sha256": capture_sha256,
                                  "manifest_sha256": manifest_sha256}
    if encrypted_capture_sha256 is not None:
        options["encrypted"] = True
        options["encrypted_capture_sha256"] = encrypted_capture_sha256
    return json.dumps(options).encode()


def build_options(path: str = OPTIONS_PATH) -> dict:
    """The build's options file in the payload ({} when there is none)."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            options = json.load(handle)
    except (OSError, ValueError) as exc:
        raise MbrescueError(f"{path} is unreadable ({exc})") from exc
    return options if isinstance(options, dict) else {}


def expected_capture_sha256(path: str = OPTIONS_PATH) -> str | None:
    """The SHA-256 of the capture file the build verified and packed, if it says."""
    value = build_options(path).get("capture_sha256")
    return value if isinstance(value, str) else None


def expected_manifest_sha256(path: str = OPTIONS_PATH) -> str | None:
    """The SHA-256 of the capture's manifest (its seal) as the build verified it, if it says.
    The manifest holds every member's and chunk's SHA-256, so a matching manifest whose
    members all match it is the capture the build verified."""
    value = build_options(path).get("manifest_sha256")
    return value if isinstance(value, str) else None


def capture_encrypted(path: str = OPTIONS_PATH) -> bool:
    """The build stored the capture age-encrypted (a passphrase opens it)."""
    return build_options(path).get("encrypted") is True


def unattended_allowed(path: str = OPTIONS_PATH) -> bool:
    """The build's explicit opt-in to unattended restores; absent means no."""
    return build_options(path).get("unattended_allowed") is True
