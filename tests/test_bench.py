"""`make bench`'s own sections run end to end on a small bench disk (one run each, no QEMU),
and each row's goal logic says `met` or `MISSED` as the figures say."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from builder.bench import (
    SECTIONS,
    bench_capture,
    bench_check,
    goal,
    make_bench_disk,
    manifest_of,
    ratio_row,
    region_bytes,
)
from builder.bench_fleet import made, reseal
from builder.bench_rescue import bench_files, bench_rescue, growth_row, ram_row, smallest_reaching

SMALL_BOOT_MIB = 48


@pytest.fixture(scope="module")
def bench_disk(tmp_path_factory):
    return make_bench_disk(tmp_path_factory.mktemp("bench-disk"), SMALL_BOOT_MIB)


def test_capture_and_restore_sections_measure_what_they_say(tmp_path, bench_disk):
    image = bench_disk
    rows, capture = bench_capture(tmp_path, image, runs=1, boot_mib=SMALL_BOOT_MIB)
    text = "\n".join(rows)
    # The capture measured is of a frozen, mounted /boot with its file archive.
    manifest = manifest_of(capture)
    assert manifest.frozen and manifest.boot_files.file_count > 0
    assert manifest.region.length_bytes == region_bytes(SMALL_BOOT_MIB)
    assert re.search(r"run 1  mbrescue capture +[\d.]+ s", text), text
    assert re.search(r"run 1  dd \| zstd -T0 -3 +[\d.]+ s", text), text
    assert re.search(r"mbrescue capture / dd \| zstd -T0 -3 +time [\d.]+x", text), text
    assert re.search(r"capture time / dd \| zstd -T0 -3: +[\d.]+x  \(goal <= 1\.50x: (met|MISSED)\)",
                     text), text
    assert re.search(r"capture size / dd \| zstd -T0 -3: +[\d.]+x  \(goal <= 1\.00x, output no "
                     r"larger: (met|MISSED)\)  \([\d.]+ MiB vs [\d.]+ MiB\)", text), text

    rows = bench_rescue(tmp_path, image, runs=1, boot=False)
    text = "\n".join(rows)
    assert re.search(r"run 1  mbrescue restore +[\d.]+ s .*tools +[\d.]+ s \(sha256sum", text), text
    assert re.search(r"mbrescue restore / standard tools: wall time [\d.]+x", text), text
    assert re.search(r"restore wall / standard tools: [\d.]+x  \(goal <= 1\.20x: (met|MISSED)\)",
                     text), text


@pytest.mark.qemu
def test_rescue_section_boots_to_the_prompt_and_times_the_check(tmp_path, bench_disk):
    """The rescue section's boot: its milestones are the runner's real lines (it waited for
    a "capture verified" before the prompt that the threaded check no longer prints)."""
    from builder.bench_rescue import _capture, _prompt_rows, _size_rows

    folder = tmp_path / "rescue"
    folder.mkdir()
    kernel, base, size_rows = _size_rows()
    assert re.search(r"base initramfs: [\d.]+ MiB zstd", size_rows[0]), size_rows
    text = "\n".join(_prompt_rows(kernel, base, _capture(bench_disk, folder), folder))
    assert re.search(r"confirmation prompt .*: [\d.]+ s", text), text
    assert re.search(r"runner started at [\d.]+ s, plan shown and prompt at [\d.]+ s; the "
                     r"capture's whole check ran beside the plan for [\d.]+ s", text), text


def test_build_section_builds_a_never_seen_capture(tmp_path, bench_disk):
    """Each measured build makes GRUB images for its host (the section raises otherwise)."""
    from builder.bench import bench_build

    text = "\n".join(bench_build(tmp_path, bench_disk, runs=2, label="small bench disk"))
    assert re.search(r"run 2  mbrescue build +[\d.]+ s +grub-mkrescue +[\d.]+ s", text), text
    assert re.search(r"mbrescue build / grub-mkrescue: time [\d.]+x", text), text
    assert re.search(r"build time \(small bench disk\) / grub-mkrescue: [\d.]+x  "
                     r"\(goal <= 1\.00x: (met|MISSED)\)", text), text


def test_check_section_compares_the_mounted_files(tmp_path, bench_disk):
    """The check timed is of a mounted /boot whose files it compares (it raises otherwise)."""
    text = "\n".join(bench_check(tmp_path, bench_disk, runs=1, boot_mib=SMALL_BOOT_MIB))
    assert re.search(r"\d+ files compared", text) and " 0 files compared" not in text, text
    assert re.search(r"run 1  mbrescue check +[\d.]+ s +mbrescue capture +[\d.]+ s +sha256sum",
                     text), text
    assert re.search(r'check time / a new capture\'s: [\d.]+x  \(goal <= 0\.50x \("well under"\): '
                     r"(met|MISSED)\)", text), text


def test_files_section_sets_both_paths_side_by_side(tmp_path, bench_disk):
    text = "\n".join(bench_files(tmp_path, bench_disk, runs=1))
    assert re.search(r"run 1  region path +[\d.]+ s +file-level path +[\d.]+ s", text), text
    assert re.search(r"file-level / region path: wall time [\d.]+x", text), text


def test_goal_says_met_or_missed():
    assert goal(1.0, 1.0) == "goal <= 1.00x: met"
    assert goal(1.01, 1.0) == "goal <= 1.00x: MISSED"
    assert ratio_row("x:", 3.0, 2.0, 1.5) == "x: 1.50x  (goal <= 1.50x: met)"
    assert ratio_row("x:", 3.3, 1.0, 1.5, ", y") == "x: 3.30x  (goal <= 1.50x, y: MISSED)"
    # A miss never reads as the limit itself.
    assert ratio_row("x:", 187.4, 186.9, 1.0) == "x: 1.003x  (goal <= 1.00x: MISSED)"


def test_growth_is_flat_only_within_ten_percent():
    assert growth_row([("a", 40.0), ("b", 41.0), ("c", 43.9)]).endswith("1.10x: met)")
    assert "MISSED" in growth_row([("a", 40.0), ("b", 60.0), ("c", 45.0)])
    assert "did not reach the prompt (goal flat: MISSED)" in growth_row([("a", 40.0), ("c", None)])


def test_ram_bisection_finds_the_smallest_step_and_judges_it():
    ladder = [128, 192, 256, 320, 384, 512, 768, 1024]
    tried: list[int] = []

    def reaches(memory: int) -> tuple[bool, str]:
        tried.append(memory)
        return memory >= 320, "prompt" if memory >= 320 else "no prompt"

    needed, rows = smallest_reaching(ladder, reaches)
    assert needed == 320 and len(rows) == len(tried) <= 3, (tried, rows)
    assert ram_row("bench", needed, ladder).endswith(
        "320 MiB (256 MiB did not)  (goal <= 256 MiB: MISSED)")
    needed, _ = smallest_reaching(ladder, lambda memory: (True, "prompt"))
    assert needed == 128
    assert ram_row("bench", 128, ladder).endswith("(the smallest tried)  (goal <= 256 MiB: met)")


def test_made_counts_what_a_build_made():
    log = ("mbrescue: building the rescue system's base initramfs (once per kit and runner)\n"
           + "mbrescue: making GRUB images (BIOS El Torito, UEFI FAT)\n" * 3)
    assert made(log) == "base initramfs 1x, GRUB images 3x"
    assert made("") == "base initramfs 0x, GRUB images 0x"


def test_a_resealed_copy_is_a_capture_of_another_host(tmp_path, captures):
    """The fleet's 50 hosts: every member as captured, a new host name and time, sealed."""
    from builder.build import check_capture

    seed = captures["A"]
    copy = reseal(seed, tmp_path / "copy.mbrescue", "fleet-07", "2026-01-02T03:04:05Z")
    opened = check_capture(copy)  # the build's own check of every byte
    try:
        assert opened.manifest.hostname == "fleet-07"
        assert opened.manifest.created == "2026-01-02T03:04:05Z"
        original = manifest_of(seed)
        assert opened.manifest.region == original.region
    finally:
        opened.close()
    assert os.stat(copy).st_mode & 0o777 == 0o600


def test_sections_are_named_and_an_unknown_one_is_refused():
    assert set(SECTIONS) == {"capture", "build", "rescue", "files", "prompt", "check", "fleet"}
    result = subprocess.run([sys.executable, "-m", "builder.bench", "nonesuch"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "no section nonesuch" in result.stderr, result.stderr
