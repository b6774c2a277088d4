"""`make bench`'s own sections run end to end on a small bench disk (one run each, no QEMU)."""

from __future__ import annotations

import re

import pytest

from builder.bench import bench_capture, make_bench_disk, manifest_of, region_bytes
from builder.bench_rescue import bench_rescue

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

    rows = bench_rescue(tmp_path, image, runs=1, boot=False)
    text = "\n".join(rows)
    assert re.search(r"run 1  mbrescue restore +[\d.]+ s .*tools +[\d.]+ s \(sha256sum", text), text
    assert re.search(r"mbrescue restore / standard tools: wall time [\d.]+x", text), text


def test_build_section_builds_a_never_seen_capture(tmp_path, bench_disk):
    """Each measured build makes GRUB images for its host (the section raises otherwise)."""
    from builder.bench import bench_build

    text = "\n".join(bench_build(tmp_path, bench_disk, runs=2, boot=False))
    assert re.search(r"run 2  mbrescue build +[\d.]+ s +grub-mkrescue +[\d.]+ s", text), text
    assert re.search(r"mbrescue build / grub-mkrescue: time [\d.]+x", text), text
