"""`make bench`: speed and size measured as ratios against the standard tools, in the same go.

Capture: a disk whose 256 MiB ext4 `/boot` is filled like a real one (kernels,
initrds, System.map files, GRUB modules, and deleted files whose blocks still hold
data) is captured by `mbrescue capture` and, from the same page-cache state, by
`dd | pigz -1` (the same codec, every core) and `dd | zstd -T0 -3`.
Later sections (initramfs, restore, ISO) are added by `run_sections`.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from . import debs
from .run import run
from .runner.manifest import Manifest

MiB = 1 << 20
BOOT_START_LBA = 2048
BOOT_MIB = 256


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _shell_pipeline(command: str) -> None:
    # A shell pipeline is the thing being compared against, so it runs as a user would type it.
    subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True)


@contextlib.contextmanager
def _mounted_partition(image: Path, offset: int, size: int, mountpoint: Path) -> Iterator[Path]:
    loop = (
        run(["losetup", "-f", "--show", "-o", str(offset), "--sizelimit", str(size), image])
        .stdout.decode()
        .strip()
    )
    try:
        run(["mount", loop, mountpoint])
        try:
            yield mountpoint
        finally:
            run(["umount", mountpoint])
    finally:
        run(["losetup", "-d", loop])


def make_bench_disk(work: Path) -> Path:
    """A 320 MiB msdos disk: 256 MiB ext4 /boot filled like a real one, then swap."""
    image = work / "bench-host.img"
    with open(image, "wb") as f:
        f.truncate((BOOT_MIB + 64) * MiB)
    run(
        ["sfdisk", "-q", image],
        input_bytes=f"label: dos\n{BOOT_START_LBA},{BOOT_MIB}MiB,83,*\n,,82\n".encode(),
    )
    offset = BOOT_START_LBA * 512
    run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            "boot",
            "-E",
            f"offset={offset}",
            image,
            f"{BOOT_MIB}M",
        ]
    )
    _, kernel_root = debs.fetch_extracted(debs.kernel_package())
    vmlinuz = next((kernel_root / "boot").glob("vmlinuz-*"))
    system_map = next((kernel_root / "boot").glob("System.map-*"))
    config = next((kernel_root / "boot").glob("config-*"))
    mnt = work / "mnt"
    mnt.mkdir()
    with _mounted_partition(image, offset, BOOT_MIB * MiB, mnt):
        # Deleted files first: their blocks keep old initrd data, as on a real /boot.
        for index in range(2):
            _write_initrd_like(mnt / f"initrd.img-old{index}", 30 * MiB, seed=index)
        os.sync()
        for index in range(2):
            (mnt / f"initrd.img-old{index}").unlink()
        for index, version in enumerate(("6.1.0-54-amd64", "6.1.0-55-amd64", "6.1.0-56-amd64")):
            data = bytearray(vmlinuz.read_bytes())
            data[-1] ^= index  # three kernels, not one file three times
            (mnt / f"vmlinuz-{version}").write_bytes(bytes(data))
            shutil.copyfile(system_map, mnt / f"System.map-{version}")
            shutil.copyfile(config, mnt / f"config-{version}")
            _write_initrd_like(mnt / f"initrd.img-{version}", 34 * MiB, seed=10 + index)
        grub_modules = Path("/usr/lib/grub/i386-pc")
        if grub_modules.is_dir():
            shutil.copytree(grub_modules, mnt / "grub" / "i386-pc")
        (mnt / "grub" / "grub.cfg").write_text(
            "set timeout=5\nmenuentry 'Debian' { linux /vmlinuz }\n"
        )
        os.sync()
    return image


def _write_initrd_like(path: Path, size: int, seed: int) -> None:
    """An initrd is compressed data: seeded random bytes behave the same and never change."""
    generator = random.Random(seed)
    with open(path, "wb") as out:
        left = size
        while left:
            piece = min(left, 4 * MiB)
            out.write(generator.randbytes(piece))
            left -= piece


def bench_capture(work: Path) -> tuple[list[str], Path]:
    image = make_bench_disk(work)
    region_bytes = (BOOT_START_LBA + BOOT_MIB * 2048) * 512
    mbrescue = [sys.executable, "-m", "builder.cli"]
    out = work / "bench.mbrescue"
    rows = []
    results: dict[str, tuple[float, int]] = {}
    for label, action, output in (
        (
            "mbrescue capture",
            lambda: subprocess.run(
                [*mbrescue, "capture", image, "-o", out, "--boot-partition", "1"],
                check=True,
                stderr=subprocess.DEVNULL,
            ),
            out,
        ),
        (
            "dd | pigz -1",
            lambda: _shell_pipeline(
                f"dd if={image} bs=4M count={region_bytes} iflag=count_bytes status=none | pigz -1 > {work}/dd.gz"
            ),
            work / "dd.gz",
        ),
        (
            "dd | zstd -T0 -3",
            lambda: _shell_pipeline(
                f"dd if={image} bs=4M count={region_bytes} iflag=count_bytes status=none | zstd -q -T0 -3 > {work}/dd.zst"
            ),
            work / "dd.zst",
        ),
    ):
        best = min(_fresh_output_time(action, output) for _ in range(3))
        results[label] = (best, output.stat().st_size)
    base_time, base_size = results["mbrescue capture"]
    rows.append(
        f"capture of a {BOOT_MIB} MiB /boot region ({region_bytes / MiB:.0f} MiB), page cache warm, best of 3:"
    )
    for label, (seconds, size) in results.items():
        rows.append(
            f"  {label:<20} {seconds:6.2f} s  {size / MiB:7.1f} MiB  "
            f"({region_bytes / MiB / seconds:6.0f} MiB/s)"
        )
    for other in ("dd | pigz -1", "dd | zstd -T0 -3"):
        seconds, size = results[other]
        rows.append(
            f"  ratio vs {other:<16} time {base_time / seconds:4.2f}x (goal <= 1.5x)   "
            f"size {base_size / size:5.3f}x (goal <= 1.00x)"
        )
    return rows, out


def _fresh_output_time(action: Callable[[], object], output: Path) -> float:
    """Every tool writes a new file: allocating one costs the same for all of them
    (mbrescue must write a new file anyway, its temporary name renamed at the end)."""
    output.unlink(missing_ok=True)
    os.sync()
    return _timed(action)


def bench_iso(work: Path, capture: Path) -> list[str]:
    """`mbrescue build` beside grub-mkrescue packing the same kernel, initramfs and payload."""
    from .build import OVERLAYS_DIR, RUNNER_DIR
    from .initramfs import make_base_initramfs, make_payload_initramfs
    from .kit import ensure_kit
    from .vm import Disk, Vm, VmConfig

    mbrescue = [sys.executable, "-m", "builder.cli"]
    iso = work / "bench.iso"
    # Warm the kit, base initramfs and GRUB caches first: the goal is for a warm cache.
    subprocess.run([*mbrescue, "build", capture, "-o", iso], check=True, stderr=subprocess.DEVNULL)
    kit = ensure_kit()
    base = make_base_initramfs(kit, RUNNER_DIR, OVERLAYS_DIR)
    tree = work / "mkrescue-tree"
    (tree / "boot" / "grub").mkdir(parents=True)
    shutil.copyfile(kit.kernel, tree / "vmlinuz")
    shutil.copyfile(base, tree / "base.img")
    make_payload_initramfs(capture, tree / "payload.img")
    (tree / "boot" / "grub" / "grub.cfg").write_text(
        "menuentry restore { linux /vmlinuz console=ttyS0\n initrd /base.img /payload.img }\n"
    )
    other = work / "mkrescue.iso"
    results = {}
    for label, action, output in (
        (
            "mbrescue build",
            lambda: subprocess.run(
                [*mbrescue, "build", capture, "-o", iso], check=True, stderr=subprocess.DEVNULL
            ),
            iso,
        ),
        (
            "grub-mkrescue",
            lambda: subprocess.run(
                ["grub-mkrescue", "-o", other, tree], check=True, capture_output=True
            ),
            other,
        ),
    ):
        best = min(_timed(action) for _ in range(3))
        results[label] = (best, output.stat().st_size)
    payload_bytes = (tree / "payload.img").stat().st_size
    (mine_s, mine_b), (theirs_s, theirs_b) = results["mbrescue build"], results["grub-mkrescue"]
    rows = ["ISO build (kit, base initramfs and GRUB caches warm), best of 3:"]
    for label, (seconds, size) in results.items():
        rows.append(f"  {label:<20} {seconds:6.2f} s  {size / MiB:7.1f} MiB")
    rows.append(
        f"  ratio vs grub-mkrescue time {mine_s / theirs_s:4.2f}x (goal <= 1x)   "
        f"size {mine_b / theirs_b:5.3f}x (goal <= 1.00x)"
    )
    overhead = mine_b - payload_bytes
    rows.append(f"  ISO overhead over the payload: {overhead / MiB:.1f} MiB (goal < 30 MB)")
    scratch = work / "scratch.img"
    with open(scratch, "wb") as blank:
        blank.truncate(_manifest(capture).source.size_bytes)
    for firmware in ("bios", "uefi"):
        config = VmConfig(
            firmware=firmware,
            memory_mib=1024,
            disks=[
                Disk(iso, interface="cdrom", readonly=True, bootindex=0),
                Disk(scratch, interface="virtio"),
            ],
        )
        with Vm(config, work / f"prompt-{firmware}.log") as vm:
            vm.expect("Type yes to write", timeout=600)
            rows.append(
                f"  QEMU (TCG) start to the restore prompt from the ISO, {firmware.upper()} CD: "
                f"{vm.elapsed():.1f} s"
            )
    return rows


def _manifest(capture: Path) -> Manifest:
    from .runner.capfile import Capture

    return Capture.open(str(capture)).manifest


def main() -> None:
    if os.geteuid() != 0:
        print("bench: needs root (loop devices and mounts)", file=sys.stderr)
        sys.exit(1)
    with tempfile.TemporaryDirectory(prefix="mbrescue-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        rows, capture = bench_capture(work)
        _print(rows)
        _print(bench_iso(work, capture))
        from .bench_rescue import bench_rescue

        _print(bench_rescue(work))


def _print(rows: list[str]) -> None:
    for line in rows:
        print(line, flush=True)


if __name__ == "__main__":
    main()
