"""The rescue system's initramfs: a host-independent base and a per-host payload.

The base holds busybox, the kit's Python with only the standard-library modules
the restore runner imports, the runner itself, the file-level restore path's
programs (in /usr/sbin, with their libraries), the disk and file-system drivers,
the overlays and `/init` (rendered from templates/init.j2). It is zstd-compressed
and cached by the hash of all its inputs, so a per-host build only writes the payload: an
uncompressed cpio holding the capture. The kernel unpacks both when they are
concatenated (base first, padded to 4 bytes), and GRUB can load them as two
initrd files.

Which stdlib modules the runner needs is found by running it: the kit's own
interpreter (through the kit's own dynamic loader, so the host's Python and
libraries play no part) imports every module of the runner package, and whatever
then sits in `sys.modules` is what the rescue system gets (the runner keeps all
its imports at module top level). The standard library's own imports inside
functions (argparse -> gettext -> locale) are then followed from the source, and
before the archive is written the runner is started once on exactly the files
chosen (`python -m mbrescue_runner --help`), so a miss fails the build, not a boot.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shlex
import stat
import sys
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import jinja2

from . import cpio, debs, log
from . import kit as kit_module
from .errors import MbrescueError
from .kit import Kit
from .run import require_tools, run
from .runner.cmdline import UNATTENDED_DONE_PATH
from .runner.outputs import commit, create_temporary

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = PROJECT_ROOT / "templates" / "init.j2"

# Where things live inside the rescue system.
RUNNER_PARENT = "/opt/mbrescue"
RUNNER_PACKAGE = "mbrescue_runner"
CAPTURE_PATH = "/mbrescue/capture.mbrescue"
PYTHON_PATH = "/usr/bin/python3.11"
STDLIB_PATH = "/usr/lib/python3.11"
LIBRARY_PATH = "/lib/x86_64-linux-gnu"
# The file-level restore path's programs (kit.RESTORE_TOOLS): first in /init's PATH, so
# they, not busybox applets of the same name, are what the runner starts.
TOOLS_PATH = "/usr/sbin"

# Waiting for disks: poll every 0.25 s until the set is unchanged for 2 s (AHCI link
# bring-up and usb-storage's 1 s settle delay fit well inside); the runner then waits for
# controllers still scanning (runner/settle.py). Neither waits past WAIT_LIMIT_S from boot
# (mbrescue.wait=N): real SAS HBAs and RAID controllers take tens of seconds to scan.
WAIT_LIMIT_S = 120
STABLE_S = 2
TICKS_PER_S = 4
# Console log level once the drivers are loaded: KERN_WARNING and more urgent.
CONSOLE_LOGLEVEL = 5
# Base images kept in the cache (the newest used); older ones are removed.
KEEP_BASES = 6

# Measured on the base with the real runner: -19 gives 9.6 MB in ~20 s of CPU, -10
# 11.0 MB in ~1 s, -16 10.4 MB in ~12 s. The base is cached per kit and runner, so the
# smaller file wins. A fixed thread count: the same bytes on every machine.
ZSTD_ARGS = ("-19", "-T2")

# Imported on demand by the interpreter itself (codec lookups by name), so not always
# visible in sys.modules after the runner's imports: taken whole.
ALWAYS_PACKAGES = ("encodings",)

# The stdlib imports many modules inside functions (argparse -> gettext -> locale only
# when a parser is built), which running the imports cannot see; so every import
# statement of the chosen files is followed as well, except into these: large, and
# nothing a disk restore reaches (test suites, interactive tools, network protocols,
# GUI, CJK codecs). A runner that needs one of them imports it at top level.
LAZY_IMPORTS_EXCLUDED = frozenset((
    "_aix_support", "_asyncio", "_bootsubprocess", "_codecs_cn", "_codecs_hk",
    "_codecs_iso2022", "_codecs_jp", "_codecs_kr", "_codecs_tw", "_multibytecodec",
    "_multiprocessing", "_osx_support", "_posixshmem", "_pydecimal", "_ssl", "_testcapi",
    "_testinternalcapi", "asyncio", "bdb", "cmd", "code", "codeop", "concurrent", "ctypes",
    "curses", "dbm", "decimal", "distutils", "doctest", "email", "ensurepip", "ftplib", "html",
    "http", "idlelib", "lib2to3", "mimetypes", "multiprocessing", "netrc", "pdb", "plistlib",
    "pydoc", "pydoc_data", "readline", "rlcompleter", "sitecustomize", "socketserver",
    "sqlite3", "ssl", "test", "tkinter", "unittest", "urllib", "venv", "webbrowser", "xml",
    "xmlrpc",
))

DISCOVER_SCRIPT = """
import importlib, sys
import runpy  # what `python -m` itself imports
stdlib_extra, names = sys.argv[1].split(":"), sys.argv[2:]
sys.path.extend(stdlib_extra)
for name in names:
    importlib.import_module(name)
for name, module in sorted(sys.modules.items()):
    print(name, getattr(module, "__file__", None) or "", sep="\\t")
"""


@dataclass(frozen=True)
class BaseRecord:
    """What went into a base initramfs, written beside it as JSON."""

    path: Path
    compressed_bytes: int  # the file's length, padding included
    uncompressed_bytes: int
    # Zero bytes after the zstd frame, for the 4-byte alignment the kernel wants; the
    # zstd tool itself calls them an unknown header, so strip them before `zstd -t`.
    padding_bytes: int
    packages: dict[str, str]
    stdlib_files: list[str]


def runner_command() -> str:
    """The exact command /init runs; also shown in the rescue shell to run it again."""
    return shlex.join([
        "PYTHONHASHSEED=0", f"PYTHONPATH={RUNNER_PARENT}", "python3", "-m", RUNNER_PACKAGE,
        "rescue", CAPTURE_PATH,
    ])


def module_plan(kit: Kit) -> list[tuple[str, str, list[str]]]:
    """(name, path, names it depends on) per module in load order, read from modules.dep."""
    depends: dict[str, list[str]] = {}
    for line in (kit.modules_root / "modules.dep").read_text().splitlines():
        module, _colon, rest = line.partition(":")
        depends[module] = rest.split()

    def name(path: str) -> str:
        return PurePosixPath(path).name.removesuffix(".ko")

    return [(name(path), path, [name(dep) for dep in depends.get(path, [])])
            for path in kit.module_load_order]


# After a restore that went on without a person, /init reboots into the restored disk after
# this many seconds (Enter on any console: at once).
UNATTENDED_REBOOT_S = 10


def render_init(kit: Kit) -> str:
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
    )
    template = environment.from_string(TEMPLATE.read_text())
    return template.render(
        kernel_version=kit.kernel_version,
        modules_dir=f"/lib/modules/{kit.kernel_version}",
        modules=module_plan(kit),
        wait_limit_s=WAIT_LIMIT_S,
        stable_s=STABLE_S,
        ticks_per_s=TICKS_PER_S,
        stable_ticks=STABLE_S * TICKS_PER_S,
        tick_us=1_000_000 // TICKS_PER_S,
        console_loglevel=CONSOLE_LOGLEVEL,
        python=PYTHON_PATH,
        capture_path=CAPTURE_PATH,
        runner_line=runner_command(),
        unattended_done_path=UNATTENDED_DONE_PATH,
        unattended_reboot_s=UNATTENDED_REBOOT_S,
    )


def runner_sources(runner_dir: Path) -> list[Path]:
    """The runner package's .py files (relative paths), caches and other files left out."""
    return sorted(
        path.relative_to(runner_dir) for path in runner_dir.rglob("*.py")
        if "__pycache__" not in path.parts
    )


def _overlay_files(overlays_dir: Path) -> list[Path]:
    if not overlays_dir.is_dir():
        return []
    return sorted(
        path.relative_to(overlays_dir) for path in overlays_dir.rglob("*")
        if path.is_symlink() or path.is_file()
    )


def _kit_python(kit: Kit) -> list[str]:
    """The kit's interpreter started by the kit's own loader with the kit's libraries."""
    loader_name = PurePosixPath(kit.elf_interpreter).name
    loader = kit_module.find_library(loader_name, kit.library_dirs)
    library_path = ":".join(os.fspath(path) for path in kit.library_dirs)
    return [os.fspath(loader), "--library-path", library_path, os.fspath(kit.python)]


def _kit_python_env(kit: Kit, pythonpath: Path | None = None) -> dict[str, str]:
    env = {"PYTHONHOME": os.fspath(kit.python_stdlib[0].parent.parent), "PYTHONHASHSEED": "0",
           "PYTHONDONTWRITEBYTECODE": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.fspath(pythonpath)
    return env


def _stdlib_relative(kit: Kit, file: str) -> Path | None:
    """The path under lib/python3.11 of a module file, if it is one of the kit's."""
    path = Path(file)
    for directory in kit.python_stdlib:
        if path.is_relative_to(directory):
            # Debian's sitecustomize is a symlink into the host's /etc: not the kit's.
            if not path.resolve().is_relative_to(directory.resolve()):
                return None
            return path.relative_to(directory)
    return None


def discover_stdlib(kit: Kit, runner_dir: Path) -> list[Path]:
    """Stdlib files (relative to lib/python3.11) the runner imports, found by running it."""
    sources = runner_sources(runner_dir)
    if Path("__main__.py") not in sources:
        raise MbrescueError(f"{runner_dir} has no __main__.py: not a runnable runner package")
    names = []
    for relative in sources:
        parts = [RUNNER_PACKAGE, *relative.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    with tempfile.TemporaryDirectory(prefix="mbrescue-discover-") as tmp:
        package = Path(tmp) / RUNNER_PACKAGE
        for relative in sources:
            (package / relative).parent.mkdir(parents=True, exist_ok=True)
            (package / relative).write_bytes((runner_dir / relative).read_bytes())
        extra = [kit.python_stdlib[1:], [d / "lib-dynload" for d in kit.python_stdlib[1:]]]
        search = ":".join(os.fspath(d) for group in extra for d in group)
        result = run([*_kit_python(kit), "-c", DISCOVER_SCRIPT, search, *names],
                     env=_kit_python_env(kit, Path(tmp)), check=False)
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        raise MbrescueError(
            "the runner cannot be imported by the rescue kit's Python",
            hint=detail[-1] if detail else None,
        )
    found: set[Path] = set()
    for line in result.stdout.decode().splitlines():
        _name, _tab, file = line.partition("\t")
        inside = _stdlib_relative(kit, file) if file else None
        if inside is not None:
            found.add(inside)
    for package_name in ALWAYS_PACKAGES:
        for directory in kit.python_stdlib:
            if (directory / package_name).is_dir():
                found.update(path.relative_to(directory)
                             for path in (directory / package_name).glob("*.py"))
    if not found:
        raise MbrescueError("finding the runner's stdlib modules gave nothing")
    return sorted(_with_lazy_imports(kit, found))


def _locate_module(kit: Kit, name: str) -> Path | None:
    """The kit's file of a stdlib module (relative to lib/python3.11), None if none."""
    parts = name.split(".")
    for directory in kit.python_stdlib:
        base = directory.joinpath(*parts)
        for candidate in (base / "__init__.py", base.with_name(base.name + ".py")):
            if candidate.is_file():
                return _stdlib_relative(kit, os.fspath(candidate))
        if len(parts) == 1:
            for candidate in sorted((directory / "lib-dynload").glob(f"{name}.cpython-*.so")):
                return _stdlib_relative(kit, os.fspath(candidate))
    return None


def _imported_names(source: bytes, module: str, is_package: bool) -> set[str]:
    """Every module an import statement anywhere in the source may load."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old escape sequences in stdlib sources
        tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from package import name` may name a submodule.
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            names.update(".".join(parts[: index + 1]) for index in range(len(parts)))
    return names


def _with_lazy_imports(kit: Kit, found: set[Path]) -> set[Path]:
    result = set(found)
    pending = [path for path in found if path.suffix == ".py"]
    while pending:
        relative = pending.pop()
        parts = list(relative.with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        source = _find_stdlib_file(kit, relative).read_bytes()
        for name in sorted(_imported_names(source, module, is_package)):
            if name.split(".")[0] in LAZY_IMPORTS_EXCLUDED:
                continue
            located = _locate_module(kit, name)
            if located is not None and located not in result:
                result.add(located)
                if located.suffix == ".py":
                    pending.append(located)
    return result


def _find_stdlib_file(kit: Kit, relative: Path) -> Path:
    for directory in kit.python_stdlib:
        if (directory / relative).is_file():
            return directory / relative
    raise MbrescueError(f"stdlib file {relative} vanished from the kit")


def _compile(kit: Kit, tree: Path, inside: str) -> None:
    """Byte-compile with unchecked hashes: no mtimes inside, nothing stat'ed at start."""
    run([*_kit_python(kit), "-m", "compileall", "-q", "-j", "1", "-d", inside,
         "--invalidation-mode", "unchecked-hash", tree], env=_kit_python_env(kit))


def input_hash(kit: Kit, runner_dir: Path, overlays_dir: Path) -> str:
    """A key over everything that decides the base's bytes."""
    digest = hashlib.sha256()

    def add(label: str, value: bytes) -> None:
        digest.update(label.encode() + b"\0" + hashlib.sha256(value).digest())

    add("packages", json.dumps(kit.package_sha256, sort_keys=True).encode())
    add("modules", json.dumps(kit.module_load_order).encode())
    add("libraries", json.dumps([p.name for p in kit.libraries]).encode())
    add("tools", json.dumps({name: path.name for name, path in sorted(kit.tools.items())}
                            ).encode())
    add("gconv", (json.dumps([p.name for p in kit.gconv_modules]) + kit.gconv_config).encode())
    for relative in runner_sources(runner_dir):
        add(f"runner/{relative}", (runner_dir / relative).read_bytes())
    for relative in _overlay_files(overlays_dir):
        path = overlays_dir / relative
        if path.is_symlink():
            add(f"overlay-link/{relative}", os.readlink(path).encode())
        else:
            add(f"overlay/{relative}/{_mode(path):o}", path.read_bytes())
    add("template", TEMPLATE.read_bytes())
    add("initramfs.py", Path(__file__).read_bytes())
    add("kit.py", Path(kit_module.__file__).read_bytes())
    add("cpio.py", Path(cpio.__file__).read_bytes())
    add("epoch", str(cpio.source_date_epoch()).encode())
    add("zstd", run(["zstd", "-V"]).stdout + " ".join(ZSTD_ARGS).encode())
    return digest.hexdigest()[:24]


def _mode(path: Path) -> int:
    # Git keeps only the executable bit; the umask of a checkout must not change the bytes.
    return 0o755 if os.access(path, os.X_OK) else 0o644


def _busybox_applets(kit: Kit) -> list[str]:
    listing = run([kit.busybox, "--list-full"]).stdout.decode().split()
    return sorted(name for name in listing if name not in ("linuxrc", "sbin/init"))


def _tree(kit: Kit, runner_dir: Path, overlays_dir: Path, staging: Path,
          stdlib_files: list[Path]) -> cpio.Tree:
    tree = cpio.Tree()
    for directory in ("dev", "proc", "sys", "run", "tmp", "root", "etc", "mnt", "var"):
        tree.directory(directory, 0o1777 if directory == "tmp" else 0o755)
    # The kernel opens /dev/console for init's stdin/out/err before /init mounts devtmpfs.
    tree.char_device("dev/console", 5, 1, 0o600)
    tree.char_device("dev/null", 1, 3, 0o666)
    tree.file("init", render_init(kit).encode(), 0o755)

    tree.file_from("bin/busybox", kit.busybox, 0o755)
    for applet in _busybox_applets(kit):
        # A busybox applet named like a kit tool (losetup, mke2fs) is left out: one program
        # per name in the rescue shell, the one the runner uses.
        if applet != "bin/busybox" and PurePosixPath(applet).name not in kit.tools:
            tree.symlink(applet, "/bin/busybox")
    tools_inside = TOOLS_PATH.lstrip("/")
    for name, source in sorted(kit.tools.items()):
        if name == source.name:
            tree.file_from(f"{tools_inside}/{name}", source, 0o755)
        else:
            tree.symlink(f"{tools_inside}/{name}", source.name)

    tree.file_from(PYTHON_PATH, kit.python, 0o755)
    tree.symlink("usr/bin/python3", "python3.11")
    extensions = [_find_stdlib_file(kit, p) for p in stdlib_files if p.suffix == ".so"]
    libraries = {path.name: path for path in kit.libraries}
    for path in kit.library_closure([*extensions, *sorted(set(kit.tools.values())),
                                     *kit.gconv_modules]):
        libraries.setdefault(path.name, path)
    for module in kit.gconv_modules:
        tree.file_from(f"{kit_module.GCONV_DIR}/{module.name}", module, 0o644)
    if kit.gconv_modules:
        tree.file(f"{kit_module.GCONV_DIR}/gconv-modules", kit.gconv_config.encode(), 0o644)
    for name, path in sorted(libraries.items()):
        tree.file_from(f"{LIBRARY_PATH}/{name}", path, 0o755)
    loader = PurePosixPath(kit.elf_interpreter)
    if str(loader.parent) != LIBRARY_PATH:
        tree.symlink(str(loader), f"{LIBRARY_PATH}/{loader.name}")
    # getpath finds the prefix by lib/python3.11/os.py and lib-dynload; both must exist.
    tree.directory(f"{STDLIB_PATH}/lib-dynload")
    tree.copy_tree(staging / STDLIB_PATH.lstrip("/"), STDLIB_PATH.lstrip("/"))
    runner_inside = f"{RUNNER_PARENT}/{RUNNER_PACKAGE}".lstrip("/")
    tree.copy_tree(staging / runner_inside, runner_inside)

    for path in sorted(kit.modules_root.rglob("*")):
        if path.is_file():
            inside = f"lib/modules/{kit.kernel_version}/{path.relative_to(kit.modules_root)}"
            tree.file_from(inside, path, 0o644)

    for relative in _overlay_files(overlays_dir):
        path = overlays_dir / relative
        if path.is_symlink():
            tree.symlink(str(relative), os.readlink(path))
        else:
            tree.file_from(str(relative), path, _mode(path))
    return tree


def _stage_python(kit: Kit, runner_dir: Path, staging: Path, stdlib_files: list[Path]) -> None:
    """Lay out the chosen files as in the rescue system, fixed modes, byte-compiled."""
    stdlib = staging / STDLIB_PATH.lstrip("/")
    runner = staging / RUNNER_PARENT.lstrip("/") / RUNNER_PACKAGE
    (stdlib / "lib-dynload").mkdir(parents=True)
    for relative in stdlib_files:
        target = stdlib / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_find_stdlib_file(kit, relative).read_bytes())
        target.chmod(0o755 if relative.suffix == ".so" else 0o644)
    for relative in runner_sources(runner_dir):
        target = runner / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((runner_dir / relative).read_bytes())
        target.chmod(0o644)
    _compile(kit, stdlib, STDLIB_PATH)
    _compile(kit, runner, f"{RUNNER_PARENT}/{RUNNER_PACKAGE}")
    for path in staging.rglob("*"):
        if path.is_dir():
            path.chmod(0o755)
        elif path.suffix == ".pyc":
            path.chmod(0o644)


def _smoke_test(kit: Kit, staging: Path) -> None:
    """Start the runner on the stripped stdlib alone, as /init will: a module the search
    missed fails the build here rather than in the rescue system. `--help` only parses."""
    env = _kit_python_env(kit, staging / RUNNER_PARENT.lstrip("/"))
    env["PYTHONHOME"] = os.fspath(staging / "usr")
    result = run([*_kit_python(kit), "-m", RUNNER_PACKAGE, "--help"], env=env, check=False)
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        raise MbrescueError(
            "the runner does not start on the rescue system's stripped Python",
            hint=detail[-1] if detail else None,
        )


def _pad4(path: Path) -> int:
    padding = -path.stat().st_size % 4
    with open(path, "ab") as stream:
        stream.write(b"\0" * padding)
    return padding


def make_base_initramfs(kit: Kit, runner_dir: Path, overlays_dir: Path,
                        out_dir: Path | None = None) -> Path:
    """The compressed base initramfs, built once per set of inputs and then reused."""
    require_tools("zstd", "depmod")
    key = input_hash(kit, runner_dir, overlays_dir)
    directory = out_dir if out_dir is not None else debs.cache_dir() / "initramfs"
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"base-{key}.img"
    if out.exists():
        log.debug(f"base initramfs from the cache: {out}")
        os.utime(out)  # recently used: kept by _prune
        return out
    log.info("building the rescue system's base initramfs (once per kit and runner)")
    stdlib_files = discover_stdlib(kit, runner_dir)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".base-") as tmp:
        staging = Path(tmp) / "staging"
        _stage_python(kit, runner_dir, staging, stdlib_files)
        _smoke_test(kit, staging)
        tree = _tree(kit, runner_dir, overlays_dir, staging, stdlib_files)
        raw = Path(tmp) / "base.cpio"
        with open(raw, "wb") as stream:
            uncompressed = cpio.write_tree(tree, stream)
        packed = Path(tmp) / "base.img"
        run(["zstd", "-q", *ZSTD_ARGS, "--no-progress", "-o", packed, raw])
        # The kernel looks for the next archive at a 4-byte boundary.
        padding = _pad4(packed)
        record = BaseRecord(out, packed.stat().st_size, uncompressed, padding,
                            dict(kit.packages), [str(path) for path in stdlib_files])
        record_path = out.with_suffix(".json")
        record_json = {**record.__dict__, "path": str(out)}
        (Path(tmp) / "base.json").write_text(json.dumps(record_json, indent=1) + "\n")
        os.replace(Path(tmp) / "base.json", record_path)
        os.replace(packed, out)
    log.info(f"base initramfs: {log.human_bytes(record.compressed_bytes)} "
             f"({log.human_bytes(uncompressed)} unpacked)")
    if out_dir is None:
        _prune(directory)
    return out


def _prune(directory: Path) -> None:
    """Keep the cache from growing with every runner edit: drop the least recently used."""
    bases = sorted(directory.glob("base-*.img"), key=lambda path: path.stat().st_mtime)
    for old in bases[:-KEEP_BASES]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)


def base_record(base: Path) -> BaseRecord:
    """The record written beside a base initramfs (sizes, packages, stdlib files)."""
    fields = json.loads(base.with_suffix(".json").read_text())
    return BaseRecord(**{**fields, "path": Path(fields["path"])})


def make_payload_initramfs(capture: Path, out: Path,
                           extra: Mapping[str, bytes] | None = None) -> Path:
    """An uncompressed cpio holding the capture at /mbrescue/capture.mbrescue.

    `extra` adds small files under /mbrescue/ (name -> contents), e.g. the runner's
    options.json. The capture can hold secrets from /boot, so everything is 0600.
    """
    if not capture.is_file():
        raise MbrescueError(f"{capture} is not a file")
    tree = cpio.Tree()
    tree.directory("mbrescue", 0o700)
    tree.file_from(CAPTURE_PATH, capture, 0o600)
    for name, data in sorted((extra or {}).items()):
        if "/" in name or name in ("", ".", ".."):
            raise MbrescueError(f"payload file name {name!r} must be a plain name")
        tree.file(f"mbrescue/{name}", data, 0o600)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The payload is the host's /boot: private from its first byte (created 0600).
    fd, tmp = create_temporary(out, stat.S_IRUSR | stat.S_IWUSR)
    try:
        with open(fd, "wb") as stream:
            cpio.write_tree(tree, stream)  # pads every member, so the length is 4-aligned
        commit(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m builder.initramfs`: (re)build the base by hand and print where it is."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m builder.initramfs", description=main.__doc__)
    parser.add_argument("--runner", type=Path, default=PROJECT_ROOT / "builder" / "runner")
    parser.add_argument("--overlays", type=Path, default=PROJECT_ROOT / "overlays")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="write here instead of the download cache")
    args = parser.parse_args(argv)
    try:
        base = make_base_initramfs(kit_module.ensure_kit(), args.runner, args.overlays,
                                   args.out_dir)
    except MbrescueError as error:
        print(f"mbrescue: error: {error}", file=sys.stderr)
        return 1
    record = base_record(base)
    print(f"{base}\t{record.compressed_bytes} bytes compressed\t"
          f"{record.uncompressed_bytes} bytes unpacked\t{len(record.stdlib_files)} stdlib files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
