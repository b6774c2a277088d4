"""The one way external programs are started.

Arguments are a list (never a shell string), stdin is /dev/null unless input is
given, the environment is clean (`LANG=C.UTF-8`), and a failure raises an
error that carries the command and its stderr.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import log
from .errors import MbrescueError, ToolMissing

Arg = str | os.PathLike[str]

# Which Debian package provides each program the project runs.
TOOL_PACKAGES: dict[str, str] = {
    "age": "age",
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "sfdisk": "fdisk",
    "sgdisk": "gdisk",
    "blkid": "util-linux",
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "fsfreeze": "util-linux",
    "mke2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "mkswap": "util-linux",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "mdir": "mtools",
    "dpkg-query": "dpkg",
    "grub-mkimage": "grub-common",
    "grub-install": "grub2-common",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "xorriso": "xorriso",
    "zstd": "zstd",
    "depmod": "kmod",
    "gzip": "gzip",
    "dd": "coreutils",
}


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": os.environ.get("HOME", "/root"),
    }
    for key in ("SOURCE_DATE_EPOCH", "TMPDIR", "MBRESCUE_CACHE", "XDG_CACHE_HOME"):
        if key in os.environ:
            env[key] = os.environ[key]
    if extra:
        env.update(extra)
    return env


def find_tool(name: str) -> str:
    found = shutil.which(name, path=base_env()["PATH"] + ":/usr/sbin:/sbin")
    if found is None:
        package = TOOL_PACKAGES.get(name, "?")
        raise ToolMissing(
            f"{name} is not installed", hint=f"apt-get install {package} (or run: make setup)"
        )
    return found


def require_tools(*names: str) -> None:
    """Fail before any work starts when a program is missing, naming its package."""
    missing = [
        name
        for name in names
        if shutil.which(name, path=base_env()["PATH"] + ":/usr/sbin:/sbin") is None
    ]
    if missing:
        packages = sorted({TOOL_PACKAGES.get(name, "?") for name in missing})
        raise ToolMissing(
            f"missing program(s): {', '.join(missing)}",
            hint=f"apt-get install {' '.join(packages)} (or run: make setup)",
        )


def run(
    cmd: Sequence[Arg],
    *,
    check: bool = True,
    capture: bool = True,
    input_bytes: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    argv = [os.fspath(arg) for arg in cmd]
    argv[0] = find_tool(argv[0]) if "/" not in argv[0] else argv[0]
    log.debug(shlex.join(argv))
    try:
        result = subprocess.run(
            argv,
            input=input_bytes,
            stdin=None if input_bytes is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            env=base_env(env),
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise MbrescueError(f"{shlex.join(argv)} timed out after {timeout} s") from exc
    if check and result.returncode != 0:
        stderr = (result.stderr or b"").decode(errors="replace").strip().splitlines()
        detail = stderr[-1] if stderr else f"exit status {result.returncode}"
        raise MbrescueError(f"{Path(argv[0]).name} failed: {detail}", hint=shlex.join(argv))
    return result


def output(cmd: Sequence[Arg], **kwargs: object) -> str:
    """Run and return stdout as text."""
    result = run(cmd, **kwargs)  # type: ignore[arg-type]
    return result.stdout.decode()
