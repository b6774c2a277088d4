"""`mbrescue inspect`: a readable summary of a capture file."""

from __future__ import annotations

from pathlib import Path

from .log import human_bytes
from .runner.capfile import Capture


def open_capture(path: Path) -> Capture:
    return Capture.open(str(path))


def describe(capture: Capture) -> str:
    m = capture.manifest
    src = m["source"]
    region = m["region"]
    layout = m["layout"]
    sector = src["logical_sector_bytes"]
    lines = [
        f"capture   {capture.path}",
        f"host      {m['hostname']}  (captured {m['created']} by mbrescue {m['tool_version']})",
        f"source    {src['path']} ({src['kind']}), {human_bytes(src['size_bytes'])} "
        f"= {src['size_bytes'] // sector} sectors of {sector} bytes (physical {src['physical_sector_bytes']})",
    ]
    identity = ", ".join(f"{k} {src[k]}" for k in ("model", "serial", "wwn") if src.get(k))
    if identity:
        lines.append(f"identity  {identity}")
    lines.append(f"table     {layout['table']}  id {layout.get('disk_id')}")
    if layout.get("gpt"):
        gpt = layout["gpt"]
        lines.append(
            f"gpt       primary {'valid' if gpt.get('primary_valid') else 'INVALID'}, backup "
            f"{'valid' if gpt.get('backup_valid') else 'INVALID'}, read from the {gpt.get('used')}"
        )
    lines.append("")
    lines.append(
        f"  {'#':>2} {'start':>10} {'sectors':>10} {'size':>10}  {'type':<14} {'fs':<6} {'label':<14} uuid"
    )
    for p in layout["partitions"]:
        fs = p.get("fs") or {}
        marks = "*" if p["number"] in m["boot_chain"] else " "
        lines.append(
            f"{marks} {p['number']:>2} {p['start_lba']:>10} {p['size_sectors']:>10} "
            f"{human_bytes(p['size_sectors'] * sector):>10}  {(p.get('type_name') or p['type'])[:14]:<14} "
            f"{(fs.get('type') or '-'):<6} {(fs.get('label') or '-')[:14]:<14} {fs.get('uuid') or '-'}"
        )
    lines.append("  (* = boot chain, inside the region)")
    lines.append("")
    ratio = region["compressed_bytes"] / region["length_bytes"] if region["length_bytes"] else 0
    lines += [
        f"region    sectors 0..{region['end_lba'] - 1} = {human_bytes(region['length_bytes'])}, "
        f"stored as {human_bytes(region['compressed_bytes'])} ({ratio:.0%}, {len(region['chunks'])} gzip members)",
        f"sha256    {region['sha256']}",
        f"/boot     partition {m['boot_partition']}"
        + (
            f", {m['boot_fs']['type']} label {m['boot_fs']['label'] or '-'} uuid {m['boot_fs']['uuid']}"
            if m.get("boot_fs")
            else ""
        )
        + (", frozen while read" if m.get("frozen") else ""),
    ]
    for swap in m["swap"]:
        lines.append(
            f"swap      partition {swap['partition']}: label {swap['label'] or '-'} uuid {swap['uuid']} "
            f"page {swap['page_bytes']} version {swap['version']} (recreated on restore)"
        )
    if m.get("gpt_tail"):
        tail = m["gpt_tail"]
        lines.append(
            f"gpt tail  {tail['length_bytes']} bytes at {tail['offset_bytes']}, sha256 {tail['sha256'][:16]}…"
        )
    files = m["boot_files"]
    if files.get("member"):
        lines.append(
            f"files     {files['file_count']} files of {files['mountpoint']} in {files['member']}"
        )
    else:
        lines.append(f"files     none: {files.get('reason')}")
    return "\n".join(lines)
