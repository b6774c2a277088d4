"""`make bench`: what a user waits for, beside the standard tools doing the same work in the same go.

One bench disk (a msdos disk whose ext4 `/boot` is filled like a real one: kernels,
initrds, System.map files, GRUB modules, and deleted files whose blocks still hold data)
serves every section:

- capture: `/boot` mounted from a loop device at the partition's offset, so
  `mbrescue capture` freezes it and adds its file archive, as on a host; beside
  `dd | zstd -T0 -3` and `dd | pigz -1` of the same region. Every tool writes a new file.
- build: a per-host build for a capture no build has seen (a fresh capture under a new
  host name each run, so no GRUB images of that host are cached; the host-independent kit
  and base initramfs are warm, as after any earlier build), beside `grub-mkrescue` packing
  the same kernel, base initramfs and payload of the same capture.
- rescue (`bench_rescue`): the base initramfs's size, restore wall time beside
  `sha256sum` + `dd conv=fsync` + `dd iflag=direct | sha256sum`, QEMU start to the prompt.

Every run is printed, then the best of each and the ratios. No goal is judged here.
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
from typing import TYPE_CHECKING

from . import debs
from .run import run

if TYPE_CHECKING:
    from .runner.manifest import Manifest

MiB = 1 << 20
BOOT_START_LBA = 2048
BOOT_MIB = 256
MBRESCUE = [sys.executable, "-m", "builder.cli"]


def region_bytes(boot_mib: int = BOOT_MIB) -> int:
    """The captured region: sector 0 up to the end of /boot (swap follows it)."""
    return (BOOT_START_LBA + boot_mib * 2048) * 512


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _fresh_output_time(action: Callable[[], object], output: Path) -> float:
    """Every tool writes a new file: allocating one costs the same for all of them
    (mbrescue must write a new file anyway, its temporary name renamed at the end)."""
    output.unlink(missing_ok=True)
    os.sync()
    return _timed(action)


def _shell_pipeline(command: str) -> None:
    # A shell pipeline is the thing being compared against, so it runs as a user would type it.
    subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True)


def _mbrescue(*args: str | os.PathLike[str]) -> str:
    """Run the real CLI as a user does; its stderr (the progress lines) is returned."""
    result = subprocess.run(
        [*MBRESCUE, *(os.fspath(arg) for arg in args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise RuntimeError(f"mbrescue {' '.join(map(str, args))} failed: {result.stderr.strip()}")
    return result.stderr


def manifest_of(capture: Path) -> Manifest:
    from .runner.capfile import Capture

    with Capture.open(os.fspath(capture)) as opened:
        return opened.manifest


@contextlib.contextmanager
def mounted_boot(image: Path, mountpoint: Path, boot_mib: int = BOOT_MIB) -> Iterator[Path]:
    """The image's /boot mounted through a loop device at the partition's offset."""
    mountpoint.mkdir(exist_ok=True)
    loop = (
        run(
            [
                "losetup",
                "-f",
                "--show",
                "-o",
                str(BOOT_START_LBA * 512),
                "--sizelimit",
                str(boot_mib * MiB),
                image,
            ]
        )
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


def make_bench_disk(work: Path, boot_mib: int = BOOT_MIB) -> Path:
    """A msdos disk: ext4 /boot of boot_mib MiB filled like a real one, then 64 MiB of swap.

    At 256 MiB: two deleted 30 MiB initrds, three kernels with their System.map, config
    and 34 MiB initrd, and GRUB's modules. A smaller disk (for the bench's own test)
    holds the same kinds of file, scaled down.
    """
    scale = boot_mib / BOOT_MIB
    image = work / "bench-host.img"
    with open(image, "wb") as f:
        f.truncate((boot_mib + 64) * MiB)
    run(
        ["sfdisk", "-q", image],
        input_bytes=f"label: dos\n{BOOT_START_LBA},{boot_mib}MiB,83,*\n,,82\n".encode(),
    )
    offset = BOOT_START_LBA * 512
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "boot", "-E", f"offset={offset}", image,
         f"{boot_mib}M"])
    _, kernel_root = debs.fetch_extracted(debs.kernel_package())
    vmlinuz = next((kernel_root / "boot").glob("vmlinuz-*"))
    system_map = next((kernel_root / "boot").glob("System.map-*"))
    config = next((kernel_root / "boot").glob("config-*"))
    with mounted_boot(image, work / "mnt", boot_mib) as mnt:
        # Deleted files first: their blocks keep old initrd data, as on a real /boot.
        for index in range(2):
            _write_initrd_like(mnt / f"initrd.img-old{index}", int(30 * MiB * scale), seed=index)
        os.sync()
        for index in range(2):
            (mnt / f"initrd.img-old{index}").unlink()
        versions = ("6.1.0-54-amd64", "6.1.0-55-amd64", "6.1.0-56-amd64")
        for index, version in enumerate(versions[: max(1, round(3 * scale))]):
            data = bytearray(vmlinuz.read_bytes())
            data[-1] ^= index  # three kernels, not one file three times
            (mnt / f"vmlinuz-{version}").write_bytes(bytes(data))
            shutil.copyfile(system_map, mnt / f"System.map-{version}")
            shutil.copyfile(config, mnt / f"config-{version}")
            _write_initrd_like(mnt / f"initrd.img-{version}", int(34 * MiB * scale), seed=10 + index)
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


def _rate(length: int, seconds: float) -> str:
    return f"{length / MiB / seconds:6.0f} MiB/s"


def bench_capture(
    work: Path, image: Path, runs: int = 3, boot_mib: int = BOOT_MIB
) -> tuple[list[str], Path]:
    """`mbrescue capture` of a mounted /boot (frozen, file archive included) beside dd | zstd."""
    length = region_bytes(boot_mib)
    out = work / "bench.mbrescue"
    dd = f"dd if={image} bs=4M count={length} iflag=count_bytes status=none"
    tools: list[tuple[str, Callable[[], object], Path]] = [
        (
            "mbrescue capture",
            lambda: _mbrescue("capture", image, "-o", out, "--boot-partition", "1",
                              "--hostname", "bench"),
            out,
        ),
        ("dd | zstd -T0 -3", lambda: _shell_pipeline(f"{dd} | zstd -q -T0 -3 > {work}/dd.zst"),
         work / "dd.zst"),
        ("dd | pigz -1", lambda: _shell_pipeline(f"{dd} | pigz -1 > {work}/dd.gz"),
         work / "dd.gz"),
    ]
    times: dict[str, list[float]] = {label: [] for label, _, _ in tools}
    sizes: dict[str, int] = {}
    rows = [
        f"capture of a mounted {boot_mib} MiB /boot ({length / MiB:.0f} MiB region), "
        f"page cache warm, each tool writing a new file, {runs} runs alternating:"
    ]
    with mounted_boot(image, work / "boot-mnt", boot_mib):
        for index in range(runs):
            # Alternating, so every tool sees the same machine load and page-cache state.
            for label, action, output in tools:
                seconds = _fresh_output_time(action, output)
                times[label].append(seconds)
                sizes[label] = output.stat().st_size
                rows.append(f"  run {index + 1}  {label:<18} {seconds:6.2f} s  "
                            f"{sizes[label] / MiB:7.1f} MiB")
    manifest = manifest_of(out)
    if not manifest.frozen or not manifest.boot_files.file_count:
        raise RuntimeError(
            f"the bench capture was not of a frozen /boot with its files (frozen="
            f"{manifest.frozen}, files={manifest.boot_files.file_count}): it measures nothing"
        )
    from .runner.capfile import Capture

    with Capture.open(os.fspath(out)) as opened:
        archive_bytes = sum(member.size for name, member in opened.members.items()
                            if name == manifest.boot_files.member)
    rows.append(
        f"  mbrescue froze /boot and archived its {manifest.boot_files.file_count} files: its "
        f"file holds the region ({manifest.region.compressed_bytes / MiB:.1f} MiB) and the "
        f"archive ({archive_bytes / MiB:.1f} MiB); dd's files hold the region only"
    )
    best = {label: min(values) for label, values in times.items()}
    for label, seconds in best.items():
        rows.append(f"  best {label:<18} {seconds:6.2f} s  {sizes[label] / MiB:7.1f} MiB  "
                    f"({_rate(length, seconds)})")
    mine_s, mine_b = best["mbrescue capture"], sizes["mbrescue capture"]
    for other in ("dd | zstd -T0 -3", "dd | pigz -1"):
        rows.append(f"  mbrescue capture / {other:<16} time {mine_s / best[other]:4.2f}x   "
                    f"size {mine_b / sizes[other]:5.3f}x")
    return rows, out


def _new_host_capture(image: Path, out: Path, hostname: str) -> Path:
    """A capture no build has seen: its own creation time, so its own medium id."""
    out.unlink(missing_ok=True)
    _mbrescue("capture", image, "-o", out, "--boot-partition", "1", "--hostname", hostname)
    return out


def bench_build(work: Path, image: Path, runs: int = 3, boot: bool = True) -> list[str]:
    """A per-host `mbrescue build` for a never-seen capture beside grub-mkrescue."""
    from .build import OVERLAYS_DIR, RUNNER_DIR
    from .initramfs import make_base_initramfs, make_payload_initramfs
    from .kit import ensure_kit

    folder = work / "build-bench"
    folder.mkdir(exist_ok=True)
    # The host-independent parts (kit, base initramfs) are warm as after any earlier build:
    # one untimed build of another host.
    warm = _new_host_capture(image, folder / "warmup.mbrescue", "bench-warmup")
    _mbrescue("build", warm, "-o", folder / "warmup.iso")
    kit = ensure_kit()
    base = make_base_initramfs(kit, RUNNER_DIR, OVERLAYS_DIR)
    tree = folder / "mkrescue-tree"
    (tree / "boot" / "grub").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kit.kernel, tree / "vmlinuz")
    shutil.copyfile(base, tree / "base.img")
    (tree / "boot" / "grub" / "grub.cfg").write_text(
        "menuentry restore {\n linux /vmlinuz console=ttyS0\n initrd /base.img /payload.img\n}\n"
    )
    iso, other = folder / "bench.iso", folder / "mkrescue.iso"
    mine: list[float] = []
    theirs: list[float] = []
    rows = [
        "per-host build of a capture never built before (GRUB images made for it; kit and "
        f"base initramfs warm), {runs} runs alternating with grub-mkrescue packing the same "
        "kernel, base initramfs and payload (payload made untimed):"
    ]
    for index in range(runs):
        capture = _new_host_capture(
            image, folder / f"host{index}.mbrescue", f"bench-new{index}-{os.getpid()}"
        )
        logged: list[str] = []

        def build(capture: Path = capture, logged: list[str] = logged) -> None:
            logged.append(_mbrescue("build", capture, "-o", iso))

        seconds = _fresh_output_time(build, iso)
        if "making GRUB images" not in logged[0]:
            raise RuntimeError("the per-host build reused cached GRUB images: not a new host")
        mine.append(seconds)
        make_payload_initramfs(capture, tree / "payload.img")
        theirs.append(
            _fresh_output_time(
                lambda: subprocess.run(
                    ["grub-mkrescue", "-o", other, tree], check=True, capture_output=True
                ),
                other,
            )
        )
        rows.append(f"  run {index + 1}  mbrescue build {mine[-1]:6.2f} s   "
                    f"grub-mkrescue {theirs[-1]:6.2f} s")
    payload_bytes = (tree / "payload.img").stat().st_size
    iso_bytes, other_bytes = iso.stat().st_size, other.stat().st_size
    rows += [
        f"  best mbrescue build  {min(mine):6.2f} s  {iso_bytes / MiB:7.1f} MiB",
        f"  best grub-mkrescue   {min(theirs):6.2f} s  {other_bytes / MiB:7.1f} MiB",
        f"  mbrescue build / grub-mkrescue: time {min(mine) / min(theirs):4.2f}x   "
        f"size {iso_bytes / other_bytes:5.3f}x",
        f"  ISO overhead over the payload: {(iso_bytes - payload_bytes) / MiB:.1f} MiB",
    ]
    if boot:
        rows += _iso_prompt_rows(folder, iso, image)
    return rows


def _iso_prompt_rows(folder: Path, iso: Path, image: Path) -> list[str]:
    from .vm import Disk, Vm, VmConfig

    rows = []
    scratch = folder / "scratch.img"
    for firmware in ("bios", "uefi"):
        scratch.unlink(missing_ok=True)
        with open(scratch, "wb") as blank:
            blank.truncate(image.stat().st_size)
        config = VmConfig(
            firmware=firmware,
            memory_mib=1024,
            disks=[
                Disk(iso, interface="cdrom", readonly=True, bootindex=0),
                Disk(scratch, interface="virtio"),
            ],
        )
        with Vm(config, folder / f"prompt-{firmware}.log") as vm:
            vm.expect("Type yes to write", timeout=600)
            rows.append(
                f"  QEMU (TCG) start to the restore prompt from the ISO, {firmware.upper()} CD: "
                f"{vm.elapsed():.1f} s"
            )
    return rows


def main() -> None:
    if os.geteuid() != 0:
        print("bench: needs root (loop devices and mounts)", file=sys.stderr)
        sys.exit(1)
    from .bench_rescue import bench_rescue

    sections = sys.argv[1:] or ["capture", "build", "rescue"]
    with tempfile.TemporaryDirectory(prefix="mbrescue-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        image = make_bench_disk(work)
        if "capture" in sections:
            _print(bench_capture(work, image)[0])
        if "build" in sections:
            _print(bench_build(work, image))
        if "rescue" in sections:
            _print(bench_rescue(work, image))


def _print(rows: list[str]) -> None:
    for line in rows:
        print(line, flush=True)


if __name__ == "__main__":
    main()
