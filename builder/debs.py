"""Debian packages fetched once per machine into the download cache.

`apt-get download` fetches the candidate version (apt checks it against the
signed archive); the file is kept under `<cache>/debs/` named by package,
version and architecture, and its SHA-256 is checked against the archive's
`SHA256:` field each time it is used. Extracted trees are cached beside it.
The cache lives outside the checkout: `$MBRESCUE_CACHE`, else
`$XDG_CACHE_HOME/mbrescue`, else `~/.cache/mbrescue`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import log
from .errors import MbrescueError
from .run import output, run


def cache_dir() -> Path:
    explicit = os.environ.get("MBRESCUE_CACHE")
    if explicit:
        base = Path(explicit)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg) / "mbrescue" if xdg else Path.home() / ".cache" / "mbrescue"
    base.mkdir(parents=True, exist_ok=True)
    return base


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Deb:
    name: str
    version: str
    arch: str
    sha256: str
    path: Path

    @property
    def key(self) -> str:
        return f"{self.name}={self.version}"


def _index_path() -> Path:
    return cache_dir() / "debs" / "index.json"


def _load_index() -> dict[str, dict[str, str]]:
    try:
        return json.loads(_index_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_atomically(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file of its own, renamed when complete.

    mkstemp, not a name from the PID: `build --jobs` writes from several threads of one
    process, and a shared temporary name let one thread rename away another's file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as stream:
            stream.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_index(index: dict[str, dict[str, str]]) -> None:
    write_atomically(_index_path(), json.dumps(index, indent=1, sort_keys=True))


# Candidate records already read in this process (`prefetch` reads many in one go).
_candidates: dict[str, dict[str, str]] = {}


def _parse_record(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line[0].isspace() or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key, value.strip())
    return fields


def _candidate(name: str) -> dict[str, str] | None:
    """The archive's record for the candidate version, or None when apt does not know it."""
    if name in _candidates:
        return _candidates[name]
    try:
        text = output(["apt-cache", "show", "--no-all-versions", name])
    except MbrescueError:
        return None
    fields = _parse_record(text)
    return fields if "Version" in fields else None


def prefetch(names: list[str]) -> None:
    """Read the candidate records of many packages with one `apt-cache` run.

    Each run reads apt's whole package lists (about half a second), so a kit of a
    dozen packages saves seconds. A name apt does not know makes the batch fail;
    then nothing is remembered and each package is looked up (and reported) alone.
    """
    try:
        text = output(["apt-cache", "show", "--no-all-versions", *names])
    except MbrescueError:
        return
    for record in text.split("\n\n"):
        fields = _parse_record(record)
        if "Package" in fields and "Version" in fields:
            _candidates.setdefault(fields["Package"], fields)


def depends_of(name: str) -> list[str]:
    """Direct dependencies (first alternative of each) of the candidate version."""
    fields = _candidate(name)
    if fields is None:
        raise MbrescueError(f"Debian package {name} is unknown to apt", hint="apt-get update")
    names = []
    for item in fields.get("Depends", "").split(","):
        first = item.split("|")[0].strip()
        if first:
            names.append(first.split()[0].split(":")[0])
    return names


def fetch(name: str) -> Deb:
    """The package's .deb from the cache, downloading the candidate version when needed."""
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    index = _load_index()
    fields = _candidate(name)
    if fields is None:
        cached = index.get(name)
        if cached and (debs / cached["file"]).exists():
            # Offline and apt lists gone: the cached file is still checked by its own record.
            path = debs / cached["file"]
            if sha256_file(path) != cached["sha256"]:
                raise MbrescueError(f"cached {path} does not match its checksum")
            return Deb(name, cached["version"], cached["arch"], cached["sha256"], path)
        raise MbrescueError(f"Debian package {name} is unknown to apt", hint="apt-get update")
    version, arch, expected = fields["Version"], fields["Architecture"], fields["SHA256"]
    filename = f"{name}_{version.replace(':', '%3a')}_{arch}.deb"
    path = debs / filename
    if not (path.exists() and sha256_file(path) == expected):
        log.info(f"downloading Debian package {name} {version}")
        with tempfile.TemporaryDirectory(dir=debs, prefix=".dl-") as tmp:
            run(["apt-get", "download", "-q", f"{name}={version}"], cwd=Path(tmp))
            got = list(Path(tmp).glob("*.deb"))
            if len(got) != 1:
                raise MbrescueError(f"apt-get download {name} gave {len(got)} files")
            if sha256_file(got[0]) != expected:
                raise MbrescueError(f"downloaded {name} {version} does not match its SHA-256")
            os.replace(got[0], path)
    index[name] = {"version": version, "arch": arch, "sha256": expected, "file": filename}
    _save_index(index)
    return Deb(name, version, arch, expected, path)


def extract(deb: Deb) -> Path:
    """The package's files, unpacked once into the cache (read-only use, please)."""
    root = cache_dir() / "extracted" / f"{deb.name}_{deb.version}_{deb.sha256[:12]}"
    stamp = root / ".complete"
    if stamp.exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".x-"))
    try:
        run(["dpkg-deb", "-x", deb.path, tmp])
        (tmp / ".complete").write_text(deb.sha256 + "\n")
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def kernel_package() -> str:
    """The versioned kernel image package behind Debian's `linux-image-amd64`."""
    for dep in depends_of("linux-image-amd64"):
        if dep.startswith("linux-image-"):
            return dep
    raise MbrescueError("linux-image-amd64 names no kernel package")


def fetch_extracted(name: str) -> tuple[Deb, Path]:
    deb = fetch(name)
    return deb, extract(deb)
