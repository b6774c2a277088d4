"""Action `mbrescue_transfer`: move one file between the controller and a host without Python.

Ansible's own `copy` and `fetch` run Python modules on the host; a protected host may have
none. This action uses only the connection itself (put_file / fetch_file: SFTP or SCP over
SSH, a plain copy for `ansible_connection=local`) and POSIX shell commands from coreutils on
the host (`sha256sum`, `cp`, `chmod`, `mkdir`, `mv`, `rm`), so it needs nothing the host
does not already have.

direction=push copies the controller's `src` to the host's `dest` (the bundle); direction=pull
copies the host's `src` to the controller's `dest` (a capture) and keeps `generations` of
it (`dest`, `dest.1`, ...). Either way the file moves only when the SHA-256 on the two sides
differ, lands under a temporary name, is checked against the sender's SHA-256 and is then
renamed into place: a failed transfer never replaces a good copy. With `become`, the host
side's commands run as the become user and the file passes through the login user's
temporary directory (the connection transfers as the login user).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import tempfile

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase

ARGUMENTS = {
    "direction": {"type": "str", "required": True, "choices": ["push", "pull"]},
    "src": {"type": "path", "required": True},
    "dest": {"type": "path", "required": True},
    "mode": {"type": "str", "default": None},
    "generations": {"type": "int", "default": 1},
}


def _local_sha256(path: str) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def _rotate(dest: str, generations: int) -> None:
    """dest -> dest.1 -> dest.2 ...; only `generations` files (dest included) stay."""
    directory, name = os.path.split(dest)
    for entry in os.listdir(directory or "."):
        suffix = entry[len(name) + 1:] if entry.startswith(name + ".") else ""
        if suffix.isdigit() and int(suffix) >= generations - 1 and int(suffix) > 0:
            os.unlink(os.path.join(directory, entry))  # older than what is kept after the shift
    for number in range(generations - 2, 0, -1):
        older = f"{dest}.{number}"
        if os.path.exists(older):
            os.replace(older, f"{dest}.{number + 1}")
    if generations > 1 and os.path.exists(dest):
        os.replace(dest, f"{dest}.1")


class ActionModule(ActionBase):
    TRANSFERS_FILES = True

    def _host(self, command: str, what: str) -> str:
        """Run a POSIX shell command on the host (as the become user, if any); its stdout."""
        result = self._low_level_execute_command(command, sudoable=True)
        if result["rc"] != 0:
            detail = (result.get("stderr") or result.get("stdout") or "").strip()
            raise AnsibleActionFail(f"{what} failed on the host (rc={result['rc']}): {detail}")
        return result.get("stdout", "")

    def _host_sha256(self, path: str) -> str | None:
        quoted = shlex.quote(path)
        out = self._host(f"if [ -e {quoted} ]; then sha256sum -- {quoted}; fi",
                         f"sha256sum {path}")
        return out.split()[0] if out.strip() else None

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        _, args = self.validate_argument_spec(argument_spec=ARGUMENTS)
        try:
            if args["direction"] == "push":
                result.update(self._push(args))
            else:
                result.update(self._pull(args))
        finally:
            self._remove_tmp_path(self._connection._shell.tmpdir)
        return result

    def _push(self, args) -> dict:
        src, dest = args["src"], args["dest"]
        want = _local_sha256(src)
        if want is None:
            raise AnsibleActionFail(f"{src}: no such file on the controller")
        if self._host_sha256(dest) == want:
            return {"changed": False, "dest": dest, "checksum": want}
        if self._task.check_mode:
            return {"changed": True, "dest": dest, "checksum": want}
        staging = self._make_tmp_path()
        staged = self._connection._shell.join_path(staging, os.path.basename(dest))
        self._transfer_file(src, staged)
        part = f"{dest}.part"
        mode = args["mode"] or "0755"
        q = shlex.quote
        self._host(f"mkdir -p -- {q(os.path.dirname(dest) or '.')} && cp -- {q(staged)} {q(part)}"
                   f" && chmod {q(mode)} {q(part)}", f"installing {dest}")
        got = self._host_sha256(part)
        if got != want:
            self._host(f"rm -f -- {q(part)}", f"removing {part}")
            raise AnsibleActionFail(f"{dest}: SHA-256 after the transfer is {got}, not {want}")
        self._host(f"mv -f -- {q(part)} {q(dest)}", f"renaming {part}")
        return {"changed": True, "dest": dest, "checksum": want}

    def _pull(self, args) -> dict:
        src, dest, generations = args["src"], args["dest"], args["generations"]
        if generations < 1:
            raise AnsibleActionFail("generations must be 1 or more")
        want = self._host_sha256(src)
        if want is None:
            raise AnsibleActionFail(f"{src}: no such file on the host")
        if _local_sha256(dest) == want:
            return {"changed": False, "dest": dest, "checksum": want}
        if self._task.check_mode:
            return {"changed": True, "dest": dest, "checksum": want}
        remote = src
        if self._connection.become:
            # The connection reads as the login user: hand it a copy it owns, in its own
            # temporary directory (mode 0700), readable by nobody else.
            staging = self._make_tmp_path()
            remote = self._connection._shell.join_path(staging, os.path.basename(src))
            q = shlex.quote
            self._host(f"cp -- {q(src)} {q(remote)} && chmod 0600 {q(remote)}"
                       f" && chown --reference={q(staging)} {q(remote)}", f"staging {src}")
        directory = os.path.dirname(dest) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # A private directory: whatever mode the connection gives the file, nobody else can
        # read it before it is 0600 (a capture holds the host's /boot).
        private = tempfile.mkdtemp(prefix=".mbrescue-fetch-", dir=directory)
        try:
            part = os.path.join(private, os.path.basename(dest))
            self._connection.fetch_file(remote, part)
            os.chmod(part, int(args["mode"] or "0600", 8))
            got = _local_sha256(part)
            if got != want:
                raise AnsibleActionFail(f"{src}: SHA-256 after the transfer is {got}, not {want}")
            _rotate(dest, generations)
            os.replace(part, dest)
        finally:
            shutil.rmtree(private, ignore_errors=True)
        return {"changed": True, "dest": dest, "checksum": want, "generations": generations}
