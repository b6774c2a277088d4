"""`make bench`, rescue side: the base initramfs's size, restore wall time, the boot to the prompt.

The base initramfs (kit, runner, overlays) as built for every ISO, compressed and unpacked.

Restore is judged on the wall time a user waits for: `mbrescue restore CAPTURE IMAGE --yes`
(check the capture's checksums, plan, write, read back from the device) beside the same
work done with standard tools in the same go, each run into a new blank image file:
`sha256sum` of the capture, `dd conv=fsync` of the raw region from the bench disk, and a
read-back `dd iflag=direct | sha256sum` (whose sum must be the captured region's). The
runner's own "wrote ... verified ..." line splits its write and verify phases.

Then the time from QEMU's start to the runner's confirmation prompt, booting the kit's
kernel directly (`-kernel`/`-initrd`, TCG, one blank disk) with the capture as the
payload, so its checksums are verified inside the VM as on a real host.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from .bench import BOOT_MIB, MBRESCUE, MiB, make_bench_disk, manifest_of
from .build import OVERLAYS_DIR, RUNNER_DIR
from .initramfs import base_record, make_base_initramfs, make_payload_initramfs
from .kit import ensure_kit
from .vm import Disk, Vm, VmConfig

PROMPT = r"Type yes to write"
PROMPT_TIMEOUT_S = 600.0
# The initrd holds the whole capture, and /init unpacks it into RAM once more.
VM_MEMORY_MIB = 1536
RUNS = 5  # a restore is a few seconds: more runs, less noise
# "mbrescue: wrote N bytes in X s (R MB/s), verified in Y s (V MB/s, how)"
RESTORE_LINE = re.compile(
    r"wrote (\d+) bytes in ([\d.]+) s \(([\d.]+) MB/s\), verified in ([\d.]+) s \(([\d.]+) MB/s"
)


def _blank(path: Path, size: int) -> Path:
    path.unlink(missing_ok=True)
    with open(path, "wb") as stream:
        stream.truncate(size)
    return path


def _capture(image: Path, folder: Path) -> Path:
    """The bench disk's capture (unmounted: the capture section measures the mounted case)."""
    out = folder / "restore.mbrescue"
    out.unlink(missing_ok=True)
    subprocess.run(
        [*MBRESCUE, "capture", image, "-o", out, "--boot-partition", "1", "--hostname", "bench"],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    return out


def _size_rows() -> tuple[Path, Path, list[str]]:
    kit = ensure_kit()
    base = make_base_initramfs(kit, RUNNER_DIR, OVERLAYS_DIR)
    record = base_record(base)
    rows = [
        f"base initramfs: {record.compressed_bytes / MiB:.1f} MiB zstd "
        f"({record.compressed_bytes / 1e6:.1f} MB), "
        f"{record.uncompressed_bytes / MiB:.1f} MiB unpacked"
    ]
    return kit.kernel, base, rows


def _prompt_rows(kernel: Path, base: Path, capture: Path, folder: Path) -> list[str]:
    payload = make_payload_initramfs(capture, folder / "payload.img")
    initrd = folder / "initrd.img"
    with open(initrd, "wb") as out:
        for member in (base, payload):
            out.write(member.read_bytes())
    disk = _blank(folder / "rescue-blank.img", manifest_of(capture).source.size_bytes)
    config = VmConfig(
        kernel=kernel,
        initrd=initrd,
        append="console=ttyS0",
        disks=[Disk(disk, serial="BENCHBLANK")],
        memory_mib=VM_MEMORY_MIB,
    )
    marks = {}
    with Vm(config, folder / "rescue-serial.log") as vm:
        # Milestones on the way, for where the time goes; each is printed once, in order.
        for label, pattern in (
            ("runner starts", r"mbrescue: capture of "),
            ("capture verified", r"mbrescue: capture verified"),
            ("prompt", PROMPT),
        ):
            vm.expect(pattern, PROMPT_TIMEOUT_S)
            marks[label] = vm.elapsed()
    capture_mib = capture.stat().st_size / MiB
    length = manifest_of(capture).region.length_bytes
    return [
        f"QEMU start -> confirmation prompt (TCG, -kernel/-initrd, one blank virtio disk, "
        f"{capture_mib:.0f} MiB capture of a {length / MiB:.0f} MiB region): "
        f"{marks['prompt']:.1f} s",
        f"  runner started at {marks['runner starts']:.1f} s, capture verified at "
        f"{marks['capture verified']:.1f} s, plan shown and prompt at {marks['prompt']:.1f} s",
    ]


def _restore_once(capture: Path, target: Path, size: int) -> tuple[float, float, float]:
    """(wall, write, verify) seconds of one `mbrescue restore --yes` into a new blank file."""
    _blank(target, size)
    started = time.perf_counter()
    result = subprocess.run(
        [*MBRESCUE, "restore", capture, target, "--yes"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"mbrescue restore failed: {result.stderr.strip()}")
    found = RESTORE_LINE.search(result.stdout + result.stderr)
    if not found:
        raise RuntimeError(f"no 'wrote ... verified' line from mbrescue restore:\n{result.stdout}")
    written = int(found.group(1))
    # The MB/s figures carry more digits than the two-decimal seconds.
    write_s = written / (float(found.group(3)) * 1e6)
    verify_s = written / (float(found.group(5)) * 1e6)
    return wall, write_s, verify_s


def _timed_output(command: list[str | Path]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return time.perf_counter() - started, result.stdout


def _tools_once(
    capture: Path, image: Path, target: Path, size: int, length: int, region_sha256: str
) -> tuple[float, float, float]:
    """The same work with standard tools: (sha256sum, dd conv=fsync, read-back) seconds."""
    _blank(target, size)
    check_s, _ = _timed_output(["sha256sum", capture])
    count = [f"count={length}", "iflag=count_bytes"]
    write_s, _ = _timed_output(
        ["dd", f"if={image}", f"of={target}", "bs=4M", *count, "conv=notrunc,fsync",
         "status=none"]
    )
    started = time.perf_counter()
    read_back = subprocess.run(
        ["bash", "-o", "pipefail", "-c",
         f"dd if={target} bs=4M count={length} iflag=direct,count_bytes status=none | sha256sum"],
        check=True, capture_output=True, text=True,
    )
    read_s = time.perf_counter() - started
    if read_back.stdout.split()[0] != region_sha256:
        raise RuntimeError("dd's read-back does not match the captured region: not the same work")
    return check_s, write_s, read_s


def _restore_rows(image: Path, capture: Path, folder: Path, runs: int) -> list[str]:
    manifest = manifest_of(capture)
    length, size = manifest.region.length_bytes, manifest.source.size_bytes
    mib = length / MiB
    restores: list[tuple[float, float, float]] = []
    tools: list[tuple[float, float, float]] = []
    rows = [
        f"restore of a {mib:.0f} MiB region into a new blank image file, {runs} runs "
        "alternating with the same work by standard tools (sha256sum of the capture, "
        "dd conv=fsync, dd iflag=direct | sha256sum):"
    ]
    for index in range(runs):
        # Alternating, so both see the same machine load and page-cache state.
        restores.append(_restore_once(capture, folder / "restore-target.img", size))
        tools.append(_tools_once(capture, image, folder / "dd-target.img", size, length,
                                 manifest.region.sha256))
        wall, write_s, verify_s = restores[-1]
        check_s, dd_s, read_s = tools[-1]
        rows.append(
            f"  run {index + 1}  mbrescue restore {wall:5.2f} s (write {write_s:.2f}, "
            f"verify {verify_s:.2f})   tools {check_s + dd_s + read_s:5.2f} s "
            f"(sha256sum {check_s:.2f}, dd {dd_s:.2f}, read-back {read_s:.2f})"
        )
    best_wall = min(run[0] for run in restores)
    best_tools = min(sum(run) for run in tools)
    best_write = min(run[1] for run in restores)
    best_dd = min(run[1] for run in tools)
    rows += [
        f"  best mbrescue restore wall {best_wall:6.2f} s   standard tools {best_tools:6.2f} s",
        f"  mbrescue restore / standard tools: wall time {best_wall / best_tools:4.2f}x",
        f"  write phase {best_write:.2f} s ({mib / best_write:.0f} MiB/s) vs dd conv=fsync "
        f"{best_dd:.2f} s ({mib / best_dd:.0f} MiB/s): {best_dd / best_write:4.2f}x dd's speed",
    ]
    return rows


def bench_rescue(work: Path, image: Path, runs: int = RUNS, boot: bool = True) -> list[str]:
    """The rescue-side bench lines; `work` is a scratch directory (a subfolder is used)."""
    folder = work / "rescue-bench"
    folder.mkdir(parents=True, exist_ok=True)
    capture = _capture(image, folder)
    rows = _restore_rows(image, capture, folder, runs)
    if boot:
        kernel, base, size_rows = _size_rows()
        rows = size_rows + rows + _prompt_rows(kernel, base, capture, folder)
    return rows


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mbrescue-bench-", dir="/var/tmp") as tmp:
        for line in bench_rescue(Path(tmp), make_bench_disk(Path(tmp), BOOT_MIB)):
            print(line, flush=True)
