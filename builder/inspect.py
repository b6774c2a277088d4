"""`mbrescue inspect`: a readable summary of a capture file."""

from __future__ import annotations

from pathlib import Path

from .log import human_bytes
from .runner import bootloader
from .runner.capfile import Capture


def open_capture(path: Path) -> Capture:
    return Capture.open(str(path))


def describe(capture: Capture) -> str:
    m = capture.manifest
    src = m.source
    region = m.region
    sector = src.logical_sector_bytes
    lines = [
        f"capture   {capture.path}",
        f"host      {m.hostname}  (captured {m.created} by mbrescue {m.tool_version})",
        f"source    {src.path} ({src.kind}), {human_bytes(src.size_bytes)} "
        f"= {src.size_sectors} sectors of {sector} bytes (physical {src.physical_sector_bytes})",
    ]
    identity = ", ".join(
        f"{name} {value}"
        for name, value in (("model", src.model), ("serial", src.serial), ("wwn", src.wwn))
        if value
    )
    if identity:
        lines.append(f"identity  {identity}")
    lines.append(
        f"MACs      {', '.join(m.macs)} (they pick its network-boot menu)"
        if m.macs
        else "MACs      none recorded (network boot: in the list menu only, unless build --mac)"
    )
    lines.append(f"table     {m.table}  id {m.disk_id}")
    lines.append("")
    lines.append(
        f"  {'#':>2} {'start':>10} {'sectors':>10} {'size':>10}  {'type':<14} {'fs':<6} {'label':<14} uuid"
    )
    for p in m.partitions:
        fs = p.fs
        marks = "*" if p.number in m.boot_chain else " "
        lines.append(
            f"{marks} {p.number:>2} {p.start_lba:>10} {p.size_sectors:>10} "
            f"{human_bytes(p.size_sectors * sector):>10}  {(p.type_name or p.type)[:14]:<14} "
            f"{(fs.type if fs else '-'):<6} {((fs.label if fs else None) or '-')[:14]:<14} "
            f"{(fs.uuid if fs else None) or '-'}"
        )
    lines.append("  (* = boot chain, inside the region)")
    lines.append("")
    ratio = region.compressed_bytes / region.length_bytes
    boot_fs = m.boot_fs
    lines += [
        f"region    sectors 0..{region.end_lba - 1} = {human_bytes(region.length_bytes)}, "
        f"stored as {human_bytes(region.compressed_bytes)} ({ratio:.0%}, {len(region.chunks)} gzip members)",
        f"sha256    {region.sha256}",
        f"/boot     partition {m.boot_partition}"
        + (
            f", {boot_fs.type} label {boot_fs.label or '-'} uuid {boot_fs.uuid}"
            if boot_fs
            else ""
        )
        + (", frozen while read" if m.frozen else ""),
    ]
    lines.append("boot loader  " + (bootloader.summary(m.boot_loader) if m.boot_loader
                                    else "not recorded (a capture from an older mbrescue)"))
    for swap in m.swap:
        lines.append(
            f"swap      partition {swap.partition}: label {swap.label or '-'} uuid {swap.uuid} "
            f"page {swap.page_bytes} (recreated on restore)"
        )
    if m.gpt_tail:
        tail = m.gpt_tail
        lines.append(
            f"gpt tail  {tail.length_bytes} bytes at {tail.offset_bytes}, sha256 {tail.sha256[:16]}…"
        )
    files = m.boot_files
    if files.member:
        lines.append(f"files     {files.file_count} files of {files.mountpoint} in {files.member}")
    elif files.file_count:
        lines.append(f"files     {files.file_count} files of {files.mountpoint}: {files.reason}")
    elif not any(copy.partition == m.boot_partition for copy in m.file_copies):
        # With a file-level copy of /boot (read from an unmounted one) the copy line below
        # says what the capture holds; "none: … no file-level copy" above it would be false.
        lines.append(f"files     none: {files.reason}")
    for copy in m.file_copies:
        lines.append(
            f"copy      partition {copy.partition} ({copy.fs.type}): {copy.file_count} files in "
            f"{copy.member}, {copy.referenced_files} of them as references into the region "
            "(for the file-level path)"
        )
    # What opening the capture checked, and only that: a damaged chunk or copy is not seen
    # here, so this line must not read as a clean bill.
    lines.append("seal      manifest.sha256 matches the manifest, member sizes match it; "
                 "region chunks and file copies not checked (mbrescue verify CAPTURE does)")
    return "\n".join(lines)
