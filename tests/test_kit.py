"""The rescue kit: real Debian packages, real ELF files, real kernel modules."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from builder import debs
from builder import kit as kit_module
from builder.kit import Kit, ensure_kit, library_closure, select_modules


@pytest.fixture(scope="session")
def kit() -> Kit:
    return ensure_kit()


def module_names(paths: list[str]) -> list[str]:
    return [Path(path).name.removesuffix(".ko").replace("-", "_") for path in paths]


def test_parts_exist(kit: Kit) -> None:
    assert kit.kernel.is_file() and kit.kernel.name == f"vmlinuz-{kit.kernel_version}"
    assert kit.busybox.is_file() and kit.python.is_file()
    assert kit.python_stdlib[0].name == "python3.11"
    assert (kit.python_stdlib[0] / "os.py").is_file()  # libpython3.11-minimal
    assert (kit.python_stdlib[1] / "json" / "__init__.py").is_file()  # libpython3.11-stdlib
    assert kit.modules_root.name == kit.kernel_version
    assert kit.elf_interpreter == "/lib64/ld-linux-x86-64.so.2"
    for name in ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
                 "busybox-static", "libc6", "zlib1g", "libexpat1", "libssl3"):
        assert kit.packages[name] and len(kit.package_sha256[name]) == 64


def test_interpreter_libraries_from_the_debs(kit: Kit) -> None:
    names = {path.name for path in kit.libraries}
    # DT_NEEDED of Debian's python3.11, the loader, and libgcc_s for pthread_exit.
    assert {"libc.so.6", "libm.so.6", "libz.so.1", "libexpat.so.1",
            "ld-linux-x86-64.so.2", "libgcc_s.so.1"} <= names
    cache = os.fspath(debs.cache_dir())
    for path in kit.libraries:
        assert os.fspath(path).startswith(cache), f"{path} is not from the downloaded debs"


def test_kit_python_runs_with_kit_libraries_only(kit: Kit) -> None:
    loader = next(p for p in kit.libraries if p.name == "ld-linux-x86-64.so.2")
    result = subprocess.run(
        [loader, "--library-path", ":".join(map(os.fspath, kit.library_dirs)), kit.python,
         "-S", "-c", "import sys, zlib, pyexpat; print(sys.version.split()[0])"],
        env={"PYTHONHOME": os.fspath(kit.python_stdlib[0].parent.parent)},
        capture_output=True, text=True, check=True,
    )
    assert result.stdout.startswith("3.11.")


def test_extension_module_closure(kit: Kit) -> None:
    hashlib_so = next((kit.python_stdlib[0] / "lib-dynload").glob("_hashlib.*.so"))
    names = {path.name for path in library_closure([hashlib_so], kit.library_dirs)}
    assert {"libcrypto.so.3", "libc.so.6"} <= names


def test_modules_with_dependencies_in_load_order(kit: Kit) -> None:
    names = module_names(kit.module_load_order)
    for wanted in kit_module.STORAGE_MODULES:
        assert wanted in names, wanted
    # depends= before the module, softdeps resolved through aliases (crct10dif for crc-t10dif).
    for before, after in (("virtio_ring", "virtio_blk"), ("virtio", "virtio_blk"),
                          ("scsi_mod", "sd_mod"), ("libata", "ahci"), ("libahci", "ahci"),
                          ("nvme_core", "nvme"), ("usbcore", "usb_storage"),
                          ("usb_storage", "uas"), ("crct10dif_generic", "crc_t10dif"),
                          ("hid", "usbhid")):
        assert names.index(before) < names.index(after), (before, after)
    assert len(names) == len(set(names))
    for relative in kit.module_load_order:
        assert (kit.modules_root / relative).is_file()


def test_file_level_restore_tools_from_the_debs(kit: Kit) -> None:
    """The programs the file-level path runs come from their Debian packages, with every
    library they link against found in the kit (by soname) and from the downloaded debs."""
    for package in kit_module.TOOL_PACKAGES:
        assert kit.packages[package] and len(kit.package_sha256[package]) == 64
    cache = os.fspath(debs.cache_dir())
    for name in ("mke2fs", "e2fsck", "mkfs.fat", "mkfs.vfat", "fsck.fat", "mcopy", "blkid",
                 "losetup", "age"):
        path = kit.tools[name]
        assert path.is_file() and not path.is_symlink(), name
        assert os.fspath(path).startswith(cache), path
    assert kit.tools["mkfs.vfat"] == kit.tools["mkfs.fat"]
    assert kit.tools["mcopy"].name == "mtools"
    names = {path.name for path in kit.library_closure(set(kit.tools.values()))}
    assert {"libext2fs.so.2", "libe2p.so.2", "libcom_err.so.2", "libblkid.so.1",
            "libsmartcols.so.1", "libuuid.so.1", "libc.so.6"} <= names
    for path in kit.library_closure(set(kit.tools.values())):
        assert os.fspath(path).startswith(cache), f"{path} is not from the downloaded debs"


def test_tools_run_with_kit_libraries_only(kit: Kit) -> None:
    loader = next(p for p in kit.libraries if p.name == "ld-linux-x86-64.so.2")
    library_path = ":".join(map(os.fspath, kit.library_dirs))
    for name, argv, expected in (("mke2fs", ["-V"], "mke2fs 1.47"),
                                 ("blkid", ["-V"], "util-linux"),
                                 ("losetup", ["--version"], "util-linux"),
                                 ("mtools", ["--version"], "mtools"),
                                 ("age", ["--version"], "1.1.1")):
        result = subprocess.run([loader, "--library-path", library_path, kit.tools[name], *argv],
                                capture_output=True, text=True, env={}, check=False)
        assert expected in result.stdout + result.stderr, (name, result)


def test_gconv_module_for_mtools(kit: Kit) -> None:
    """mtools converts names to code page 850 through glibc's gconv module IBM850."""
    assert [path.name for path in kit.gconv_modules] == ["IBM850.so"]
    lines = [line.split() for line in kit.gconv_config.splitlines()]
    assert ["alias", "CP850//", "IBM850//"] in lines
    assert ["module", "INTERNAL", "IBM850//", "IBM850", "1"] in lines


def test_file_system_modules_for_the_read_back(kit: Kit) -> None:
    names = module_names(kit.module_load_order)
    for before, after in (("jbd2", "ext4"), ("mbcache", "ext4"), ("crc16", "ext4")):
        assert names.index(before) < names.index(after), (before, after)
    assert "loop" in names and "isofs" in names


def test_trimmed_tree_is_depmodded(kit: Kit) -> None:
    dep = (kit.modules_root / "modules.dep").read_text()
    assert "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko" in dep
    on_disk = sorted(str(p.relative_to(kit.modules_root))
                     for p in kit.modules_root.rglob("*.ko"))
    assert on_disk == sorted(kit.module_load_order)
    assert "virtio:" in (kit.modules_root / "modules.alias").read_text()


def test_select_modules_unknown_name_fails(kit: Kit) -> None:
    full_tree = kit.kernel.parent.parent / "lib" / "modules" / kit.kernel_version
    with pytest.raises(kit_module.MbrescueError, match="no_such_driver"):
        select_modules(full_tree, ["no_such_driver"])


def test_index_written_by_many_threads_at_once(tmp_path, monkeypatch):
    """`build --jobs 2` resolves the kit on two threads of one process: a temporary name
    made from the PID alone was shared, and one thread's rename took the other's file
    (seen: `.index.json.PID.tmp: No such file or directory`)."""
    import threading

    from builder import debs

    monkeypatch.setenv("MBRESCUE_CACHE", str(tmp_path))
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def write(n: int) -> None:
        start.wait()
        try:
            for _ in range(50):
                debs._save_index({"p": {"version": str(n)}})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert debs._load_index()["p"]["version"] in {str(n) for n in range(8)}
    assert not [p for p in (tmp_path / "debs").iterdir() if p.name != "index.json"]


# Run in a fresh process (the resolution is cached per process): resolve the Secure Boot
# loaders, and say how often apt-cache ran, counted by a wrapper first in PATH.
LOADERS_IN_A_NEW_PROCESS = """
from builder.kit import ensure_efi_loaders
loaders = ensure_efi_loaders()
print(loaders.shim.is_file(), loaders.packages)
"""


def test_secure_boot_loaders_are_remembered_until_apt_changes(tmp_path):
    """Every per-host build asked `apt-cache` for shim's and signed GRUB's candidates:
    1.3 s of a 2.3 s build of fixture A's capture. Like the kit, the resolution is
    remembered (keyed by apt's lists), so a second process asks apt nothing."""
    ensure_kit()  # the cache holds the packages already
    real = subprocess.run(["sh", "-c", "command -v apt-cache"], capture_output=True,
                          text=True, check=True).stdout.strip()
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    calls = tmp_path / "apt-cache.calls"
    (wrappers / "apt-cache").write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {real} "$@"\n')
    (wrappers / "apt-cache").chmod(0o755)
    env = dict(os.environ, PATH=f"{wrappers}:{os.environ['PATH']}")

    def resolve() -> str:
        run = subprocess.run([str(Path(".venv/bin/python").absolute()), "-c",
                              LOADERS_IN_A_NEW_PROCESS], cwd=Path(__file__).parent.parent,
                             env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("True {"), run.stdout
        return run.stdout

    def asked() -> str:
        return calls.read_text() if calls.exists() else ""

    first = resolve()  # may resolve (a state of apt's lists not seen before)
    after_first = asked()
    assert resolve() == first
    assert asked() == after_first, "the second process asked apt again"
