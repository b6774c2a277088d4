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

`bench_files`: the file-level restore (`restore --files`: new table, file systems made
again, files unpacked and read back) beside the region path, of the same capture into new
blank image files.

`bench_prompt`: QEMU start to the restore prompt from the ISO as a user boots it (BIOS CD,
UEFI CD, one blank virtio disk, GRUB's menu and its timeout included), beside the floor: the
same kernel with the same command line reaching user space from a trivial initramfs (a
static busybox printing a line) on the same VM, started by QEMU itself (`-kernel/-initrd`,
the goal's floor: no boot loader at all) and, shown beside it, from a grub-mkrescue CD.
Then the prompt time for captures of three sizes, and the RAM the rescue system needs: the
smallest `-m` (of a fixed ladder) that still reaches the prompt, found by bisection, and
whether the large capture reaches it with the goal's 256 MiB.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .bench import (
    BOOT_MIB,
    MBRESCUE,
    MiB,
    goal,
    make_bench_disk,
    manifest_of,
    mbrescue_run,
    ratio_row,
)
from .build import OVERLAYS_DIR, RUNNER_DIR
from .initramfs import base_record, make_base_initramfs, make_payload_initramfs
from .kit import ensure_kit
from .vm import Disk, Vm, VmConfig, VmTimeout

PROMPT = r"Type yes to write"
PROMPT_TIMEOUT_S = 600.0
# The initrd holds the whole capture, and /init unpacks it into RAM once more.
VM_MEMORY_MIB = 1536
RUNS = 5  # a restore is a few seconds: more runs, less noise
RESTORE_GOAL = 1.2  # wall time vs the same work by standard tools
PROMPT_GOAL = 1.5  # vs the same kernel reaching user space with a trivial initramfs
GROWTH_GOAL = 1.1  # "flat": the largest capture's prompt time within 10% of the smallest's
RAM_GOAL_MIB = 256  # whatever the capture's size
PROMPT_RUNS = 2
PROMPT_MEMORY_MIB = 1024  # every timed boot, rescue and floor alike
MEMORY_LADDER_MIB = (128, 192, 256, 320, 384, 512, 768, 1024)
FLOOR_MARKER = "MBRESCUE-FLOOR-USERSPACE"
# Where a boot that cannot reach the prompt ends (no reboot: -no-reboot, panic=0).
BOOT_FAILED = r"mbrescue: error:|Kernel panic|Out of memory"
# "mbrescue: wrote N bytes in X s (R MiB/s), verified in Y s (V MiB/s, how)"
RESTORE_LINE = re.compile(
    r"wrote (\d+) bytes in ([\d.]+) s \(([\d.]+) MiB/s\), verified in ([\d.]+) s \(([\d.]+) MiB/s"
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
        for label, pattern in (("runner starts", r"mbrescue: capture of "), ("prompt", PROMPT)):
            vm.expect(pattern, PROMPT_TIMEOUT_S)
            marks[label] = vm.elapsed()
        # The whole capture is checked on a thread of its own while the plan is shown; the
        # first write waits for it, and then says how long it took (the disk is scratch).
        vm.send("yes\r")
        checked = float(vm.expect(r"mbrescue: capture verified in ([\d.]+) s",
                                  PROMPT_TIMEOUT_S).group(1))
        marks["verified"] = vm.elapsed()
    capture_mib = capture.stat().st_size / MiB
    length = manifest_of(capture).region.length_bytes
    return [
        f"QEMU start -> confirmation prompt (TCG, -kernel/-initrd, one blank virtio disk, "
        f"{capture_mib:.0f} MiB capture of a {length / MiB:.0f} MiB region): "
        f"{marks['prompt']:.1f} s",
        f"  runner started at {marks['runner starts']:.1f} s, plan shown and prompt at "
        f"{marks['prompt']:.1f} s; the capture's whole check ran beside the plan for "
        f"{checked:.1f} s (yes typed at once: it ended at {marks['verified']:.1f} s)",
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
    # The MiB/s figures carry more digits than the two-decimal seconds.
    write_s = written / (float(found.group(3)) * (1 << 20))
    verify_s = written / (float(found.group(5)) * (1 << 20))
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
        "  " + ratio_row("restore wall / standard tools:", best_wall, best_tools, RESTORE_GOAL),
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



def _restore_wall(capture: Path, target: Path, size: int, *extra: str) -> float:
    """Wall seconds of one `mbrescue restore CAPTURE TARGET --yes [extra]` into a new blank file."""
    _blank(target, size)
    started = time.perf_counter()
    result = mbrescue_run("restore", capture, target, "--yes", *extra)
    seconds = time.perf_counter() - started
    if "restore complete" not in result.stdout + result.stderr:
        raise RuntimeError(f"mbrescue restore {' '.join(extra)} did not complete")
    return seconds


def bench_files(work: Path, image: Path, runs: int = 3) -> list[str]:
    """The file-level restore's wall time beside the region path's, for the bench capture."""
    folder = work / "files-bench"
    folder.mkdir(parents=True, exist_ok=True)
    capture = _capture(image, folder)
    manifest = manifest_of(capture)
    if not manifest.file_copies:
        raise RuntimeError("the bench capture holds no file-level copy: --files cannot run")
    size = manifest.source.size_bytes
    region: list[float] = []
    files: list[float] = []
    for _ in range(runs):
        # Alternating, so both see the same machine load and page-cache state.
        region.append(_restore_wall(capture, folder / "region-target.img", size))
        files.append(_restore_wall(capture, folder / "files-target.img", size, "--files"))
    rows = [
        f"restore of the bench capture ({manifest.region.length_bytes / MiB:.0f} MiB region, "
        f"{sum(copy.file_count for copy in manifest.file_copies)} files in its file-level "
        "copy) into a new blank image file, "
        f"{runs} runs alternating, region path vs file-level path (restore --files):"
    ]
    rows += [
        f"  run {index + 1}  region path {r:6.2f} s   file-level path {f:6.2f} s"
        for index, (r, f) in enumerate(zip(region, files, strict=True))
    ]
    rows += [
        f"  best region path {min(region):6.2f} s   file-level path {min(files):6.2f} s",
        f"  file-level / region path: wall time {min(files) / min(region):4.2f}x "
        "(no goal: the file-level path's figure beside the region path's)",
    ]
    return rows


def _floor_args() -> str:
    """The rescue ISO's default entry's command line, without mbrescue's own words."""
    from .grub import kernel_args

    return " ".join(arg for arg in kernel_args("floor", serial_console=False).split()
                    if not arg.startswith("mbrescue."))


def floor_initramfs(out: Path) -> Path:
    """A trivial initramfs: a static busybox whose /init only says that user space runs."""
    from . import cpio
    from .kit import ensure_kit

    tree = cpio.Tree()
    tree.file_from("bin/busybox", ensure_kit().busybox, 0o755)
    tree.directory("dev")
    tree.char_device("dev/console", 5, 1)
    # console=tty0 comes last (the default entry's), so /dev/console is the screen: the line
    # goes to the serial port itself, where the bench reads it.
    tree.file("init", (
        "#!/bin/busybox sh\n"
        "/bin/busybox mount -t devtmpfs dev /dev\n"
        f"echo {FLOOR_MARKER} > /dev/ttyS0\n"
        "exec /bin/busybox poweroff -f\n"
    ).encode(), 0o755)
    with open(out, "wb") as stream:
        cpio.write_tree(tree, stream)
    return out


def floor_iso(folder: Path, kernel: Path, out: Path) -> Path:
    """The CD floor: the kit's kernel, the rescue ISO's default command line and the
    trivial initramfs, packed by grub-mkrescue with no menu timeout."""
    iso_tree = folder / "floor-tree"
    (iso_tree / "boot" / "grub").mkdir(parents=True, exist_ok=True)
    floor_initramfs(iso_tree / "floor.img")
    shutil.copyfile(kernel, iso_tree / "vmlinuz")
    args = _floor_args()
    (iso_tree / "boot" / "grub" / "grub.cfg").write_text(
        "serial --unit=0 --speed=115200\nterminal_input serial console\n"
        "terminal_output serial console\nset timeout=0\n"
        f"menuentry floor {{\n linux /vmlinuz {args}\n initrd /floor.img\n}}\n"
    )
    subprocess.run(["grub-mkrescue", "-o", out, iso_tree], check=True, capture_output=True)
    return out


def _boot(iso: Path | tuple[Path, Path], firmware: str, scratch: Path, log: Path,
          memory_mib: int, until: str) -> tuple[float | None, float | None, str]:
    """Boot iso as a CD (or a (kernel, initrd) pair directly) with one blank disk:
    (seconds from QEMU's start to `until`, or None; seconds to the kernel's first line,
    or None; how it ended)."""
    disks = [Disk(scratch, interface="virtio")]
    if isinstance(iso, tuple):
        config = VmConfig(firmware=firmware, memory_mib=memory_mib, kernel=iso[0],
                          initrd=iso[1], append=_floor_args(), disks=disks)
    else:
        config = VmConfig(
            firmware=firmware,
            memory_mib=memory_mib,
            disks=[Disk(iso, interface="cdrom", readonly=True, bootindex=0), *disks],
        )
    kernel_s = None
    with Vm(config, log) as vm:
        try:
            for pattern in (r"Linux version \d", until):
                found = vm.expect(f"(?P<done>{pattern})|{BOOT_FAILED}", PROMPT_TIMEOUT_S)
                if found.group("done") is None:
                    return None, kernel_s, found.group(0)
                if kernel_s is None:
                    kernel_s = vm.elapsed()
        except VmTimeout as exc:
            return None, kernel_s, str(exc).splitlines()[0]
        return vm.elapsed(), kernel_s, "reached"


def _build_iso(capture: Path, out: Path) -> Path:
    out.unlink(missing_ok=True)
    mbrescue_run("build", capture, "-o", out)
    return out


def _fixture_capture(folder: Path) -> Path:
    from .fixtures import ensure_fixture

    small = ensure_fixture("A")
    out = folder / "small.mbrescue"
    out.unlink(missing_ok=True)
    mbrescue_run("capture", small.path, "-o", out, "--boot-partition",
                 str(small.boot_partition), "--hostname", "bench-small")
    return out


def _at(seconds: float | None) -> str:
    return f"{seconds:5.1f} s" if seconds is not None else "  -  "


def bench_prompt(work: Path, image: Path, runs: int = PROMPT_RUNS, *,
                 large_image: Path | None = None, large_boot_mib: int = 1024,
                 memory_probe: bool = True) -> list[str]:
    """QEMU start to the restore prompt from the ISO beside the floors, the growth with the
    capture's size, and the RAM the rescue system needs."""
    folder = work / "prompt-bench"
    folder.mkdir(parents=True, exist_ok=True)
    kernel = ensure_kit().kernel
    bench_capture = _capture(image, folder)
    iso = _build_iso(bench_capture, folder / "bench.iso")
    floors: dict[str, Path | tuple[Path, Path]] = {
        # The goal's floor: the kernel started by QEMU itself, no boot loader at all.
        "direct": (kernel, floor_initramfs(folder / "floor.img")),
        # The same through a CD and GRUB (grub-mkrescue's), no menu timeout.
        "CD": floor_iso(folder, kernel, folder / "floor.iso"),
    }
    scratch = _blank(folder / "scratch.img", manifest_of(bench_capture).source.size_bytes)
    rows = [
        f"QEMU (TCG, -m {PROMPT_MEMORY_MIB}, one blank virtio disk) start to the restore prompt "
        f"from the ISO as a CD ({bench_capture.stat().st_size / MiB:.0f} MiB bench capture; "
        "GRUB's menu timeout included), beside the floor: the same kernel and command line "
        "reaching user space with a trivial initramfs on the same VM, started directly "
        "(-kernel/-initrd: the goal's floor) and from a grub-mkrescue CD; "
        f"{runs} runs alternating (k = the kernel's first line on serial):"
    ]
    best: dict[str, float] = {}
    for firmware in ("bios", "uefi"):
        name = f"{firmware.upper()} CD"
        mine: list[float] = []
        theirs: dict[str, list[float]] = {label: [] for label in floors}
        for index in range(runs):
            seconds, kernel_s, how = _boot(iso, firmware, scratch,
                                           folder / f"{firmware}-{index}.log",
                                           PROMPT_MEMORY_MIB, PROMPT)
            shown = [f"  run {index + 1}  {name}: restore prompt {_at(seconds)} "
                     f"(k {_at(kernel_s)})" + ("" if seconds is not None else f" [{how}]")]
            if seconds is not None:
                mine.append(seconds)
            for label, floor in floors.items():
                floor_s, floor_kernel_s, floor_how = _boot(
                    floor, firmware, scratch, folder / f"floor-{label}-{firmware}-{index}.log",
                    PROMPT_MEMORY_MIB, FLOOR_MARKER)
                shown.append(f"floor {label} {_at(floor_s)} (k {_at(floor_kernel_s)})"
                             + ("" if floor_s is not None else f" [{floor_how}]"))
                if floor_s is not None:
                    theirs[label].append(floor_s)
            rows.append("   ".join(shown))
        if mine and theirs["direct"]:
            best[firmware] = min(mine)
            floor_best = {label: min(times) for label, times in theirs.items() if times}
            rows.append(f"  best {name}: restore prompt {min(mine):5.1f} s   floor " + ", ".join(
                f"{label} {seconds:5.1f} s" for label, seconds in floor_best.items()))
            rows.append("  " + ratio_row(f"prompt time / floor (direct), {name}:", min(mine),
                                         floor_best["direct"], PROMPT_GOAL))
            if "CD" in floor_best:
                rows.append(f"  prompt time / floor (grub-mkrescue CD), {name}: "
                            f"{min(mine) / floor_best['CD']:4.2f}x (beside the goal)")
        else:
            if mine:
                best[firmware] = min(mine)
            rows.append(f"  prompt time / floor, {name}: no run reached both "
                        f"(goal <= {PROMPT_GOAL:.2f}x: MISSED)")
    growth, large = _growth_rows(folder, scratch, best.get("bios"), bench_capture,
                                 large_image, large_boot_mib)
    rows += growth
    if memory_probe:
        rows += _memory_rows(folder, iso, scratch, bench_capture, large)
    return rows


def _growth_rows(
    folder: Path, scratch: Path, bench_s: float | None, bench_capture: Path,
    large_image: Path | None, large_boot_mib: int, runs: int = PROMPT_RUNS,
) -> tuple[list[str], tuple[Path, Path, Path] | None]:
    """The BIOS CD prompt time for a small, the bench and (when given) a large capture, the
    small and the large booted `runs` times alternating and taken at their best, as the
    bench capture is; also the large one's (capture, ISO, blank disk) for the RAM rows."""
    small = _fixture_capture(folder)
    booted: list[tuple[str, Path, Path, Path]] = [(
        "fixture A", small, _build_iso(small, folder / "small.iso"),
        _blank(folder / "small-scratch.img", manifest_of(small).source.size_bytes))]
    large = None
    if large_image is not None:
        large_folder = folder / "large"
        large_folder.mkdir(exist_ok=True)
        large_capture = _capture(large_image, large_folder)
        large = (large_capture, _build_iso(large_capture, large_folder / "large.iso"),
                 _blank(large_folder / "scratch.img",
                        manifest_of(large_capture).source.size_bytes))
        booted.append((f"{large_boot_mib} MiB /boot", *large))
    times: dict[str, list[float | None]] = {label: [] for label, *_ in booted}
    for index in range(runs):
        for label, _, iso, disk in booted:
            seconds, _, _ = _boot(iso, "bios", disk, folder / f"growth-{label.split()[0]}-"
                                  f"{index}.log", PROMPT_MEMORY_MIB, PROMPT)
            times[label].append(seconds)
    sizes = [(booted[0][0], booted[0][1], times[booted[0][0]]), ("bench", bench_capture, None)]
    sizes += [(label, capture, times[label]) for label, capture, _, _ in booted[1:]]
    rows = ["how the prompt time grows with the capture (BIOS CD, -m "
            f"{PROMPT_MEMORY_MIB}, {runs} runs alternating, best taken; the bench capture's is "
            "its best above):"]
    best: list[tuple[str, float | None]] = []
    for label, capture, runs_s in sizes:
        manifest = manifest_of(capture)
        if runs_s is None:
            reached = [bench_s] if bench_s is not None else []
        else:
            reached = [seconds for seconds in runs_s if seconds is not None]
        fastest = min(reached) if reached else None
        best.append((label, fastest))
        shown = "   ".join(f"{seconds:5.1f} s" if seconds is not None else "no prompt"
                           for seconds in (runs_s if runs_s is not None else [bench_s]))
        rows.append(f"  {label:<16} capture {capture.stat().st_size / MiB:6.0f} MiB "
                    f"(region {manifest.region.length_bytes / MiB:5.0f} MiB): {shown}")
    rows.append(growth_row(best))
    return rows, large


def growth_row(times: list[tuple[str, float | None]]) -> str:
    """The prompt time's growth from the smallest capture (first) to the largest (last)."""
    (small, smallest), (large, largest) = times[0], times[-1]
    if smallest is None or largest is None:
        return f"  growth {small} -> {large}: a capture did not reach the prompt (goal flat: MISSED)"
    return (f"  growth {small} -> {large}: {largest - smallest:+.1f} s, "
            f"{largest / smallest:4.2f}x  (goal flat: "
            f"{goal(largest / smallest, GROWTH_GOAL)})")


def smallest_reaching(
    ladder: list[int], reaches: Callable[[int], tuple[bool, str]]
) -> tuple[int, list[str]]:
    """Bisection for the smallest ladder step that reaches the prompt; the top step is
    known to (the timed boots ran with it). Returns the step and one row per boot tried."""
    rows = []
    low, high = -1, len(ladder) - 1
    while high - low > 1:
        middle = (low + high) // 2
        reached, how = reaches(ladder[middle])
        rows.append(f"  -m {ladder[middle]:4d}: {how}")
        if reached:
            high = middle
        else:
            low = middle
    return ladder[high], rows


def ram_row(what: str, needed: int, ladder: list[int]) -> str:
    below = (" (the smallest tried)" if needed == ladder[0]
             else f" ({ladder[ladder.index(needed) - 1]} MiB did not)")
    verdict = "met" if needed <= RAM_GOAL_MIB else "MISSED"
    return (f"  {what}: smallest -m that reaches the prompt {needed} MiB{below}  "
            f"(goal <= {RAM_GOAL_MIB} MiB: {verdict})")


def _memory_rows(folder: Path, iso: Path, scratch: Path, capture: Path,
                 large: tuple[Path, Path, Path] | None) -> list[str]:
    """The smallest -m of MEMORY_LADDER_MIB that reaches the prompt (bisection below the
    timed boots' -m, which reached it), BIOS CD; the large capture tried at the goal."""
    ladder = [mib for mib in MEMORY_LADDER_MIB if mib <= PROMPT_MEMORY_MIB]
    rows = [f"RAM the rescue system needs, measured as the smallest QEMU -m of "
            f"{'/'.join(map(str, ladder))} MiB that reaches the prompt, BIOS CD, by bisection "
            "(assumes more RAM never hurts):"]

    def reaches(memory_mib: int) -> tuple[bool, str]:
        seconds, _, how = _boot(iso, "bios", scratch, folder / f"memory-{memory_mib}.log",
                                memory_mib, PROMPT)
        if seconds is None:
            return False, f"no prompt ({how})"
        return True, f"prompt at {seconds:5.1f} s"

    needed, tried = smallest_reaching(ladder, reaches)
    rows += tried
    rows.append(ram_row(f"bench capture ({capture.stat().st_size / MiB:.0f} MiB)", needed,
                        ladder))
    if large is not None:
        large_capture, large_iso, large_scratch = large
        seconds, _, how = _boot(large_iso, "bios", large_scratch,
                                folder / f"memory-large-{RAM_GOAL_MIB}.log", RAM_GOAL_MIB, PROMPT)
        reached = f"prompt at {seconds:.1f} s" if seconds is not None else f"no prompt ({how})"
        verdict = "met" if seconds is not None else "MISSED"
        rows.append(f"  large capture ({large_capture.stat().st_size / MiB:.0f} MiB) with -m "
                    f"{RAM_GOAL_MIB}: {reached}  (goal <= {RAM_GOAL_MIB} MiB whatever the "
                    f"capture's size: {verdict})")
    return rows


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mbrescue-bench-", dir="/var/tmp") as tmp:
        for line in bench_rescue(Path(tmp), make_bench_disk(Path(tmp), BOOT_MIB)):
            print(line, flush=True)
