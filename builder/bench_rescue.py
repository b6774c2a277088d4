"""`make bench`, rescue side: the base initramfs's size, the boot to the prompt, restore speed.

Three numbers for issue 3. The base initramfs (kit, runner, overlays) as built for every
ISO, compressed and unpacked. The time from QEMU's start to the runner's confirmation
prompt, booting the kit's kernel directly (`-kernel`/`-initrd`, TCG, one blank disk) with
the bench disk's capture as the payload, so the capture's checksums are verified inside
the VM as on a real host. And `mbrescue restore CAPTURE IMAGE --yes` into an image file
beside `dd` of the same raw region from the source image, alternating, best of 5: the
runner's own "wrote ... verified ..." line splits its write phase from its verify phase,
so the write phase is what is compared with dd.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from .bench import BOOT_MIB, BOOT_START_LBA, MiB, make_bench_disk
from .build import OVERLAYS_DIR, RUNNER_DIR
from .initramfs import base_record, make_base_initramfs, make_payload_initramfs
from .kit import ensure_kit
from .runner.capfile import Capture
from .vm import Disk, Vm, VmConfig

REGION_BYTES = (BOOT_START_LBA + BOOT_MIB * 2048) * 512
PROMPT = r"Type yes to write"
PROMPT_TIMEOUT_S = 600.0
# The initrd holds the whole capture, and /init unpacks it into RAM once more.
VM_MEMORY_MIB = 1536
SIZE_GOAL_BYTES = 20 * 1000 * 1000
WRITE_RATIO_GOAL = 0.8
RUNS = 5  # the write phase is well under a second: more runs, less noise
# "mbrescue: wrote N bytes in X s (R MB/s), verified in Y s (V MB/s, how)"
RESTORE_LINE = re.compile(
    r"wrote (\d+) bytes in ([\d.]+) s \(([\d.]+) MB/s\), verified in ([\d.]+) s \(([\d.]+) MB/s"
)
MBRESCUE = [sys.executable, "-m", "builder.cli"]


def _blank(path: Path, size: int) -> Path:
    path.unlink(missing_ok=True)
    with open(path, "wb") as stream:
        stream.truncate(size)
    return path


def _capture(work: Path) -> tuple[Path, Path]:
    """The bench disk and its capture, made in work/ (the capture section makes its own)."""
    image = make_bench_disk(work)
    out = work / "bench.mbrescue"
    subprocess.run(
        [*MBRESCUE, "capture", image, "-o", out, "--boot-partition", "1", "--hostname", "bench"],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    return image, out


def _size_rows() -> tuple[Path, Path, list[str]]:
    kit = ensure_kit()
    base = make_base_initramfs(kit, RUNNER_DIR, OVERLAYS_DIR)
    record = base_record(base)
    verdict = "ok" if record.compressed_bytes < SIZE_GOAL_BYTES else "OVER THE GOAL"
    rows = [
        f"base initramfs: {record.compressed_bytes / MiB:.1f} MiB zstd "
        f"({record.compressed_bytes / 1e6:.1f} MB; goal < 20 MB: {verdict}), "
        f"{record.uncompressed_bytes / MiB:.1f} MiB unpacked"
    ]
    return kit.kernel, base, rows


def _prompt_rows(kernel: Path, base: Path, capture: Path, work: Path) -> list[str]:
    payload = make_payload_initramfs(capture, work / "payload.img")
    initrd = work / "initrd.img"
    with open(initrd, "wb") as out:
        for member in (base, payload):
            out.write(member.read_bytes())
    disk = _blank(work / "rescue-blank.img", (BOOT_MIB + 64) * MiB)
    config = VmConfig(
        kernel=kernel,
        initrd=initrd,
        append="console=ttyS0",
        disks=[Disk(disk, serial="BENCHBLANK")],
        memory_mib=VM_MEMORY_MIB,
    )
    marks = {}
    with Vm(config, work / "rescue-serial.log") as vm:
        # Milestones on the way, for where the time goes; each is printed once, in order.
        for label, pattern in (
            ("runner starts", r"mbrescue: capture of "),
            ("capture verified", r"mbrescue: capture verified"),
            ("prompt", PROMPT),
        ):
            vm.expect(pattern, PROMPT_TIMEOUT_S)
            marks[label] = vm.elapsed()
    capture_mib = capture.stat().st_size / MiB
    return [
        f"QEMU start -> confirmation prompt (TCG, -kernel/-initrd, one blank virtio disk, "
        f"{capture_mib:.0f} MiB capture of a {REGION_BYTES / MiB:.0f} MiB region): "
        f"{marks['prompt']:.1f} s",
        f"  runner started at {marks['runner starts']:.1f} s, capture verified at "
        f"{marks['capture verified']:.1f} s, plan shown and prompt at {marks['prompt']:.1f} s",
    ]


def _restore_once(capture: Path, target: Path) -> tuple[float, float, float]:
    """(wall, write, verify) seconds of one `mbrescue restore --yes` into a fresh file."""
    _blank(target, (BOOT_MIB + 64) * MiB)
    started = time.perf_counter()
    result = subprocess.run(
        [*MBRESCUE, "restore", capture, target, "--yes"], capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"mbrescue restore failed: {result.stderr.strip()}")
    found = RESTORE_LINE.search(result.stdout)
    if not found:
        raise RuntimeError(f"no 'wrote ... verified' line from mbrescue restore:\n{result.stdout}")
    written = int(found.group(1))
    # The MB/s figures carry more digits than the one-decimal seconds.
    write_s = written / (float(found.group(3)) * 1e6)
    verify_s = written / (float(found.group(5)) * 1e6)
    return wall, write_s, verify_s


def _dd_once(image: Path, target: Path) -> float:
    _blank(target, (BOOT_MIB + 64) * MiB)
    started = time.perf_counter()
    # The same bytes, the same kind of target, and flushed to it as the runner does.
    subprocess.run(
        [
            "dd",
            f"if={image}",
            f"of={target}",
            "bs=4M",
            f"count={REGION_BYTES}",
            "iflag=count_bytes",
            "conv=notrunc,fsync",
            "status=none",
        ],
        check=True,
    )
    return time.perf_counter() - started


def _restore_rows(image: Path, capture: Path, work: Path) -> list[str]:
    manifest = Capture.open(str(capture)).manifest
    assert manifest.region.length_bytes == REGION_BYTES, manifest.region
    restores: list[tuple[float, float, float]] = []
    dds: list[float] = []
    for _ in range(RUNS):
        # Alternating, so both see the same machine load and page-cache state.
        restores.append(_restore_once(capture, work / "restore-target.img"))
        dds.append(_dd_once(image, work / "dd-target.img"))
    wall, write_s, _ = min(restores, key=lambda run: run[1])
    verify_s = min(run[2] for run in restores)
    dd_s = min(dds)
    ratio = dd_s / write_s
    verdict = "ok" if ratio >= WRITE_RATIO_GOAL else "UNDER THE GOAL"
    mib = REGION_BYTES / MiB
    return [
        f"restore of a {mib:.0f} MiB region into an image file, best of {RUNS} (alternating):",
        f"  mbrescue restore write  {write_s:6.2f} s  ({mib / write_s:6.0f} MiB/s)",
        f"  mbrescue restore verify {verify_s:6.2f} s  ({mib / verify_s:6.0f} MiB/s)",
        f"  mbrescue restore wall   {wall:6.2f} s  (checksums, plan, write, verify)",
        f"  dd bs=4M conv=fsync     {dd_s:6.2f} s  ({mib / dd_s:6.0f} MiB/s)",
        f"  write phase vs dd: {ratio:4.2f}x of dd's speed (goal >= {WRITE_RATIO_GOAL}x: {verdict})",
        # Sub-second runs on a shared machine: every run, so noise is visible as noise.
        "  runs (write / dd, s): "
        + ", ".join(f"{run[1]:.2f}/{dd:.2f}" for run, dd in zip(restores, dds, strict=True)),
    ]


def bench_rescue(work: Path) -> list[str]:
    """The rescue-side bench lines; `work` is a scratch directory (a subfolder is used)."""
    folder = work / "rescue-bench"
    folder.mkdir(parents=True, exist_ok=True)
    kernel, base, rows = _size_rows()
    image, capture = _capture(folder)
    rows += _restore_rows(image, capture, folder)
    rows += _prompt_rows(kernel, base, capture, folder)
    return rows


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mbrescue-bench-", dir="/var/tmp") as tmp:
        for line in bench_rescue(Path(tmp)):
            print(line, flush=True)
