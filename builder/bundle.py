"""`mbrescue bundle -o PATH`: the host side as one executable that needs nothing installed.

The file is a small static launcher (`bundle_stub.c`, compiled here with gcc against
glibc's static library) followed by a payload made from the rescue kit's own parts:
Debian's dynamic loader, the Python 3.11 interpreter and the shared libraries it links
against, the extension modules the host side imports, and two zip archives of
byte-compiled modules: the standard-library modules the host side imports, and the host
side itself (`host.py` and every module of this package it reaches by relative imports:
capture, freeze, log, errors, the runner). The launcher copies each payload file into a
sealed memfd and runs the loader on the interpreter, so nothing is unpacked onto any file
system and nothing outlives the process, whatever ends it (SIGTERM, SIGKILL, a power
cut). From the host it needs only a Linux kernel (3.17 or later: memfd) with /proc mounted
and memfds executable (not `vm.memfd_noexec=2`); no shell, no Python, no library.

Which standard-library modules go in is found as for the rescue system (`initramfs.
discover_stdlib`): the kit's interpreter really imports every module of the staged host
package, and the stdlib's own imports inside functions are then followed from the source.
Before the file is renamed into place it is run once (`--version`, `capture --help`), so
a bundle that cannot start is never written.
"""

from __future__ import annotations

import ast
import os
import shutil
import struct
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from . import __version__, initramfs, log
from . import kit as kit_module
from .errors import MbrescueError
from .kit import Kit
from .run import run
from .runner.outputs import check_output_dir, commit, create_temporary

PACKAGE_DIR = Path(__file__).resolve().parent
STUB_SOURCE = PACKAGE_DIR / "bundle_stub.c"
HOST_ENTRY = "host.py"
# The host package's name inside the bundle (its imports are relative: any name works).
PACKAGE_NAME = "mbrescue"
MAGIC = b"MBRBND01"
# Never an existing directory: /proc refuses new names, so the host's own Python
# installation can never be found through it.
PYTHON_HOME = "/proc/mbrescue-bundle"
# Fixed zip member times: two bundles of the same inputs are the same bytes.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
# No host-side command opens a TLS connection. _hashlib (OpenSSL, 4.7 MB of libcrypto)
# stays: measured here, OpenSSL's SHA-256 hashes 1683 MB/s, the interpreter's built-in
# one 98 MB/s, and every byte of a capture is hashed.
EXTENSIONS_LEFT_OUT = frozenset(("_ssl",))
# Payload files are zlib streams the launcher inflates into the memfds. Measured here:
# 17.5 MB of payload make an 8.6 MiB bundle (13.4 MB stored as they are, without
# libcrypto: 12.8 MiB); inflating costs about 0.2 s of start-up (`--version` 0.07 s ->
# 0.3 s). Level 9: inflating is as fast whatever the level.
ZLIB_LEVEL = 9
# The kit's Debian packages the bundle's files come from, for `--version`.
BUNDLE_PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
                   "libc6", "zlib1g", "libexpat1", "libgcc-s1")

# The entry module: extension modules are memfds named in MBRESCUE_EXTENSIONS (no
# directory holds them, so a finder maps each name to its /proc/self/fd path).
BOOT_MODULE = '''"""Bundle entry: extension modules from the launcher's memfds, then the host CLI."""

import os
import sys
from importlib.machinery import ExtensionFileLoader, ModuleSpec


class _MemfdExtensions:
    def __init__(self, files):
        self.files = files

    def find_spec(self, name, path=None, target=None):
        file = self.files.get(name)
        if file is None:
            return None
        return ModuleSpec(name, ExtensionFileLoader(name, file), origin=file)


def _install():
    listed = os.environ.pop("MBRESCUE_EXTENSIONS", "")
    files = dict(item.split("=", 1) for item in listed.split(":") if item)
    sys.meta_path.insert(0, _MemfdExtensions(files))


if __name__ == "__main__":
    _install()
    from .host import main

    sys.exit(main())
'''


@dataclass(frozen=True)
class BundleOptions:
    output: Path


@dataclass(frozen=True)
class BundleReport:
    path: Path
    size_bytes: int
    start_seconds: float  # `PATH --version`, measured on the build machine
    stdlib_modules: int
    packages: dict[str, str]


# ---- what goes in ----------------------------------------------------------------------------


def host_sources(entry: Path = PACKAGE_DIR / HOST_ENTRY) -> list[Path]:
    """Files of the package (relative to it) that the entry reaches by relative imports."""
    root = entry.parent
    found: set[Path] = set()
    pending = [entry.relative_to(root)]
    while pending:
        relative = pending.pop()
        if relative in found:
            continue
        found.add(relative)
        package = relative.parent
        for parent in [package, *package.parents]:
            if (root / parent / "__init__.py").is_file():
                pending.append(parent / "__init__.py")
        tree = ast.parse((root / relative).read_bytes(), filename=str(relative))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package
            for _ in range(node.level - 1):
                base = base.parent
            module_parts = node.module.split(".") if node.module else []
            target = base.joinpath(*module_parts)
            candidates = [target.with_suffix(".py") if module_parts else None,
                          target / "__init__.py"]
            candidates += [target / f"{alias.name}.py" for alias in node.names]
            candidates += [target / alias.name / "__init__.py" for alias in node.names]
            pending.extend(c for c in candidates if c is not None and (root / c).is_file())
    return sorted(found)


def _bundle_info(kit: Kit) -> str:
    packages = {name: kit.packages[name] for name in BUNDLE_PACKAGES if name in kit.packages}
    return (
        '"""Written by builder/bundle.py: which rescue kit this bundle was made from."""\n\n'
        f"KIT = {{'mbrescue': {__version__!r}, 'packages': {packages!r}}}\n"
    )


def stage_host_package(kit: Kit, into: Path) -> Path:
    """The host package as it runs in the bundle: sources, kit record, entry module."""
    package = into / PACKAGE_NAME
    for relative in host_sources():
        target = package / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PACKAGE_DIR / relative, target)
    (package / "_bundle_info.py").write_text(_bundle_info(kit))
    (package / "__main__.py").write_text(BOOT_MODULE)
    return package


def _write_zip(path: Path, tree: Path) -> None:
    """Byte-compiled modules of `tree` at the places zipimport looks for them (X.pyc)."""
    members: dict[str, Path] = {}
    for pyc in tree.rglob("__pycache__/*.pyc"):
        module = pyc.name.split(".")[0]
        inside = pyc.parent.parent.relative_to(tree) / f"{module}.pyc"
        members[inside.as_posix()] = pyc
    if not members:
        raise MbrescueError(f"nothing was byte-compiled under {tree}")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, pyc in sorted(members.items()):
            info = zipfile.ZipInfo(name, ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, pyc.read_bytes(), compresslevel=9)


def compile_stub(work: Path) -> Path:
    """The launcher, static (no loader, no library needed to start it)."""
    compiler = shutil.which("gcc")
    if compiler is None:
        raise MbrescueError("gcc is not installed (the bundle's launcher is compiled here)",
                            hint="apt-get install gcc libc6-dev zlib1g-dev")
    stub = work / "stub"
    result = run([compiler, "-static", "-Os", "-s", "-Wall", "-Wl,--build-id=none",
                  "-o", stub, STUB_SOURCE, "-lz"], check=False)
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        raise MbrescueError("compiling the bundle's launcher failed",
                            hint=f"{detail[-1] if detail else ''} (apt-get install gcc libc6-dev "
                                 "zlib1g-dev)")
    return stub


# ---- the file ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PayloadFile:
    name: str  # the memfd's name (shown in /proc/PID/maps)
    source: Path


def payload_layout(kit: Kit, stdlib_zip: Path, host_zip: Path,
                   extensions: list[Path]) -> tuple[list[PayloadFile], list[str], list[str]]:
    """The payload's files and the launcher's argument and environment templates."""
    loader_name = PurePosixPath(kit.elf_interpreter).name
    loader = kit_module.find_library(loader_name, kit.library_dirs)
    libraries = {path.name: path for path in kit.libraries if path.name != loader_name}
    for path in kit.library_closure(extensions):
        if path.name != loader_name:
            libraries.setdefault(path.name, path)
    files = [PayloadFile(loader_name, loader)]
    files += [PayloadFile(name, path) for name, path in sorted(libraries.items())]
    preload = [f"{{{index}}}" for index in range(1, len(files))]
    python_at = len(files)
    files.append(PayloadFile("python3.11", kit.python))
    stdlib_at = len(files)
    files.append(PayloadFile("stdlib.zip", stdlib_zip))
    files.append(PayloadFile("mbrescue.zip", host_zip))
    extension_refs = []
    for path in extensions:
        extension_refs.append(f"{path.name.split('.')[0]}={{{len(files)}}}")
        files.append(PayloadFile(path.name, path))
    arguments = [
        "{0}",
        # Only the bundle's libraries: the host's ld.so.cache and its libraries play no part
        # (every library is preloaded, so the loader never searches a directory).
        "--inhibit-cache",
        "--preload", " ".join(preload),
        "--argv0", "{argv0}",
        f"{{{python_at}}}",
        # No site (no host site-packages), no user site, no cwd or script dir on sys.path.
        "-S", "-s", "-P",
        "-m", PACKAGE_NAME,
    ]
    environment = [
        f"PYTHONHOME={PYTHON_HOME}",
        f"PYTHONPATH={{{stdlib_at}}}:{{{stdlib_at + 1}}}",
        "PYTHONDONTWRITEBYTECODE=1",
        "PYTHONUTF8=1",
        "MBRESCUE_BUNDLE={argv0}",
        "MBRESCUE_BUNDLE_FILE={exe}",
        f"MBRESCUE_EXTENSIONS={':'.join(extension_refs)}",
    ]
    return files, arguments, environment


def _index(placed: list[tuple[PayloadFile, int, int, int]], arguments: list[str],
           environment: list[str]) -> bytes:
    out = bytearray(struct.pack("<I", len(placed)))
    for file, offset, stored, size in placed:
        out += struct.pack("<QQQ", offset, stored, size) + file.name.encode() + b"\0"
    for group in (arguments, environment):
        out += struct.pack("<I", len(group))
        for text in group:
            if "\0" in text:
                raise MbrescueError(f"bundle template holds a NUL byte: {text!r}")
            out += text.encode() + b"\0"
    return bytes(out)


def write_bundle_file(path: Path, stub: Path, files: list[PayloadFile], arguments: list[str],
                      environment: list[str]) -> None:
    with open(path, "wb") as out:
        out.write(stub.read_bytes())
        placed = []
        for file in files:
            data = file.source.read_bytes()
            packed = zlib.compress(data, ZLIB_LEVEL)
            # Stored as it is when zlib does not shrink it (the zip archives): the launcher
            # tells the two apart by stored size < size.
            stored = packed if len(packed) < len(data) else data
            placed.append((file, out.tell(), len(stored), len(data)))
            out.write(stored)
        index_at = out.tell()
        out.write(_index(placed, arguments, environment))
        out.write(struct.pack("<Q", index_at) + MAGIC)
        out.flush()
        os.fsync(out.fileno())


# ---- the whole job -------------------------------------------------------------------------------


def _output_path(output: Path) -> Path:
    if output.is_dir():
        output = output / "mbrescue-host"
    if not output.parent.is_dir():
        raise MbrescueError(f"{output.parent}: no such directory for the bundle",
                            hint=f"create it first: mkdir -p {output.parent}")
    if output.exists() and not output.is_file():
        raise MbrescueError(f"{output} exists and is not a regular file")
    check_output_dir(output.parent)  # before the build: refused at once, not after it
    return output


def _try_bundle(path: Path) -> float:
    """Run the new bundle as a host would; the seconds `--version` took."""
    started = time.monotonic()
    result = run([path.absolute(), "--version"], check=False)
    seconds = time.monotonic() - started
    help_result = run([path.absolute(), "capture", "--help"], check=False)
    for ran, what in ((result, "--version"), (help_result, "capture --help")):
        if ran.returncode != 0 or (what == "--version" and not ran.stdout.startswith(b"mbrescue ")):
            detail = (ran.stderr or ran.stdout).decode(errors="replace").strip().splitlines()
            raise MbrescueError(f"the new bundle does not start ({what})",
                                hint=detail[-1] if detail else None)
    return seconds


def bundle(options: BundleOptions) -> BundleReport:
    output = _output_path(options.output)
    with tempfile.TemporaryDirectory(prefix="mbrescue-bundle-") as tmp:
        work = Path(tmp)
        stub = compile_stub(work)  # first: a missing compiler fails before any download
        kit = kit_module.ensure_kit()
        package = stage_host_package(kit, work / "host")
        stdlib_files = [path for path in initramfs.discover_stdlib(kit, package)
                        if path.suffix == ".py" or path.name.split(".")[0] not in
                        EXTENSIONS_LEFT_OUT]
        log.debug(f"bundle: {len(stdlib_files)} stdlib files")
        stdlib_tree = work / "stdlib"
        extensions = []
        for relative in stdlib_files:
            source = initramfs._find_stdlib_file(kit, relative)
            if relative.suffix == ".so":
                extensions.append(source)
                continue
            target = stdlib_tree / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        initramfs._compile(kit, stdlib_tree, "<mbrescue-bundle>/stdlib")
        initramfs._compile(kit, package, f"<mbrescue-bundle>/{PACKAGE_NAME}")
        _write_zip(work / "stdlib.zip", stdlib_tree)
        _write_zip(work / "mbrescue.zip", work / "host")
        files, arguments, environment = payload_layout(
            kit, work / "stdlib.zip", work / "mbrescue.zip", sorted(extensions))
        # Created 0700 under a fresh name (never a file someone planted), 0755 once whole.
        fd, temporary = create_temporary(output, 0o700)
        os.close(fd)  # written by name, then run: no descriptor open for writing
        try:
            write_bundle_file(temporary, stub, files, arguments, environment)
            temporary.chmod(0o755)
            start_seconds = _try_bundle(temporary)
            commit(temporary, output)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    return BundleReport(
        path=output,
        size_bytes=output.stat().st_size,
        start_seconds=start_seconds,
        stdlib_modules=sum(1 for path in stdlib_files if path.suffix == ".py"),
        packages={name: kit.packages[name] for name in BUNDLE_PACKAGES if name in kit.packages},
    )


def summary(report: BundleReport) -> str:
    return (f"wrote {report.path}: {log.human_bytes(report.size_bytes)}, "
            f"{report.stdlib_modules} stdlib modules, started in {report.start_seconds:.2f} s "
            f"(run it on any x86-64 Linux host: {report.path.name} capture|check|restore|install|uninstall|refresh|--version)")
