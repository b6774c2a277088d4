"""`mbrescue check CAPTURE [SOURCE]`: does the capture still match the live boot disk?

Standard library only: it runs on the protected host, from the project or the bundle,
typically from a timer as `check || capture`. It reads the capture's manifest only (a
capture file, or the capture inside a rescue ISO's payload), never the region, and
holds SOURCE against it: the partition table and its identities, the MBR boot code,
the post-MBR gap (GRUB's core image), the boot chain's file system UUIDs and labels,
and /boot's files against the list the capture recorded (`runner/bootfiles.py`), or,
when /boot was not mounted at capture, against the list its file-level copy holds.

A /boot that is not mounted now (a disk image, an offline disk, a host that mounts /boot
only for updates) is read the way capture reads it: a read-only loop device at the
partition's offset, mounted `ro,noload` (no journal replay; nothing is written to
SOURCE), and compared file by file exactly as a mounted one. Where its files cannot be
compared (no loop devices, not root, a file system type this machine cannot mount
read-only), the boot region's bytes are held against the captured region's SHA-256: the
same bytes are the same files; other bytes are one difference line saying what was not
compared, never a match. The running system's root file system holding /boot is the
one case left out (a note): its files change all day.

What does not count as drift: atime (never recorded); GRUB's environment block
(`grubenv`), which GRUB rewrites at boot; a file whose content, mode and owner are
unchanged but whose mtime moved. `--strict` counts the last two. Exit status:
  0  the capture matches (notes on stderr say what was not compared and why);
  1  it drifted, or /boot's files could not be compared and the region's bytes differ
     (one line per difference on stdout): `check || capture` then captures again, which
     is always safe, where an error would leave a stale capture in place;
  2  error (one `mbrescue: error:` line): nothing was compared.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import stat
import struct
import sys
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from . import bootfiles, capfile, filecopy
from .console import printable
from .errors import MbrescueError
from .isofs import BadRecord, directory_records, record_name
from .layout import Layout, Partition, read_layout
from .manifest import FileEntry, Manifest
from .outputs import open_input

EXIT_MATCHES, EXIT_DRIFTED, EXIT_ERROR = 0, 1, 2
ISO_SECTOR = 2048
ISO_PAYLOAD = ("MBRESCUE", "PAYLOAD.IMG")
CAPTURE_IN_PAYLOAD = capfile.PAYLOAD_CAPTURE_MEMBER


@dataclass(frozen=True)
class Difference:
    kind: str  # table, partition, mbr, gap, filesystem, file, kernel, unchecked
    subject: str  # what differs: "partition 2", "grub/grubenv", "MBR"
    line: str  # the line printed
    volatile: bool = False  # not drift unless --strict


@dataclass(frozen=True)
class CheckReport:
    capture: str
    source: str
    hostname: str
    created: str
    strict: bool
    differences: tuple[Difference, ...]
    ignored: tuple[Difference, ...]
    notes: tuple[str, ...]
    files_compared: int | None

    @property
    def matches(self) -> bool:
        return not self.differences

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["matches"] = self.matches
        return data


# ---- the capture: a capture file, or the one inside a rescue ISO --------------------------


def _iso_file(fd: int, path: tuple[str, ...]) -> tuple[int, int]:
    """(byte offset, length) of a file in an ISO 9660 image, found by its primary names."""
    for index in range(16, 64):
        descriptor = os.pread(fd, ISO_SECTOR, index * ISO_SECTOR)
        if len(descriptor) < ISO_SECTOR or descriptor[1:6] != b"CD001" or descriptor[0] == 255:
            break
        if descriptor[0] == 1:
            record = descriptor[156:190]
            break
    else:
        record = b""
    if not record:
        raise MbrescueError("not an ISO 9660 image (no primary volume descriptor)")
    size = os.fstat(fd).st_size
    extent, length = struct.unpack_from("<I", record, 2)[0], struct.unpack_from("<I", record, 10)[0]
    for depth, wanted in enumerate(path):
        if extent * ISO_SECTOR + length > size or length > 1 << 24:
            raise MbrescueError("a directory of the ISO lies outside the file")
        found = _find_in_directory(os.pread(fd, length, extent * ISO_SECTOR), wanted,
                                   directory=depth < len(path) - 1)
        if found is None:
            raise MbrescueError(f"the ISO holds no /{'/'.join(path[: depth + 1]).lower()}")
        extent, length = found
    if extent * ISO_SECTOR + length > size:
        raise MbrescueError(f"/{'/'.join(path).lower()} in the ISO lies outside the file")
    return extent * ISO_SECTOR, length


def _find_in_directory(data: bytes, wanted: str, directory: bool) -> tuple[int, int] | None:
    try:
        for _, record in directory_records(data, ISO_SECTOR):
            name = record_name(record).decode("ascii", "replace").split(";")[0].upper()
            flags = record[25]
            if name.rstrip(".") == wanted and bool(flags & 2) == directory:
                if flags & 0x80:
                    raise MbrescueError(f"{wanted} in the ISO is a multi-extent file")
                return (struct.unpack_from("<I", record, 2)[0],
                        struct.unpack_from("<I", record, 10)[0])
    except BadRecord:
        raise MbrescueError("a directory record of the ISO is cut short") from None
    return None


def _capture_in_iso(path: str, fd: int) -> capfile.Capture:
    payload_at, payload_bytes = _iso_file(fd, ISO_PAYLOAD)
    base, size = capfile.newc_member(fd, payload_at, payload_bytes, CAPTURE_IN_PAYLOAD)
    try:
        members = capfile._members(path, fd, base, size)
    except MbrescueError as exc:
        raise MbrescueError(f"{path}: the capture in its payload is damaged ({exc})") from None
    manifest = capfile._read_manifest(path, fd, members)
    return capfile.Capture(path, fd, manifest, members, base, size)


@contextlib.contextmanager
def _opened(path: str) -> Iterator[capfile.Capture]:
    """A capture file, or the capture inside a rescue ISO, its file-level copies checked:
    they are what check compares /boot with and what a restore unpacks, so a damaged one
    is an error here, not a match."""
    try:
        capture = capfile.Capture.open(path)
    except MbrescueError as not_capture:
        try:
            fd = open_input(path)  # a FIFO is refused, not waited on
        except MbrescueError:
            raise not_capture from None
        try:
            if os.pread(fd, 5, 16 * ISO_SECTOR + 1) != b"CD001":
                raise not_capture from None
            capture = _capture_in_iso(path, fd)
        except BaseException:
            os.close(fd)
            raise
    with capture:
        capture.verify_copies()
        yield capture


def load_manifest(path: str) -> Manifest:
    """The checked manifest of a capture file, or of the capture inside a rescue ISO."""
    with _opened(path) as capture:
        return capture.manifest


def _copied_files(capture: capfile.Capture) -> tuple[FileEntry, ...] | None:
    """/boot's files as its file-level copy holds them (for a capture of an unmounted
    /boot, which records no list of its own); None without such a copy."""
    manifest = capture.manifest
    copy = next((c for c in manifest.file_copies if c.partition == manifest.boot_partition),
                None)
    if copy is None or copy.member not in capture.members:
        return None
    member = capture.members[copy.member]
    stream = io.BufferedReader(capfile.Window(capture.fd, member.offset, member.size))
    try:
        return tuple(_entry(item) for item in bootfiles.list_from_copy(stream))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise MbrescueError(f"{capture.path}: {copy.member} cannot be read ({exc})") from None


def _load(path: str) -> tuple[Manifest, tuple[FileEntry, ...] | None]:
    """The manifest, and /boot's files from its file-level copy where it lists none."""
    with _opened(path) as capture:
        fingerprint = capture.manifest.fingerprint
        if fingerprint is None or fingerprint.files is not None:
            return capture.manifest, None
        return capture.manifest, _copied_files(capture)


# ---- SOURCE: by default the disk holding the mounted /boot ----------------------------------


def _sys_read(path: str) -> str | None:
    try:
        with open(path) as stream:
            return stream.read().strip()
    except OSError:
        return None


def default_source() -> str:
    """The whole disk (or the image file behind a loop device) holding the mounted /boot."""
    from ..freeze import mounts  # the host side's mount table reader (standard library too)

    boot = next((m for m in reversed(mounts()) if m.mountpoint == "/boot"), None)
    if boot is None:
        raise MbrescueError("no file system is mounted at /boot: name the boot disk as SOURCE")
    sys_dir = os.path.realpath(f"/sys/dev/block/{boot.device}")
    backing = _sys_read(os.path.join(sys_dir, "loop", "backing_file"))
    if backing:  # a loop device at the partition's offset in an image file (tests, VMs)
        return backing
    if _sys_read(os.path.join(sys_dir, "partition")) is None:
        raise MbrescueError(f"/boot ({boot.device}) is not a partition of a disk: name SOURCE")
    uevent = _sys_read(os.path.join(os.path.dirname(sys_dir), "uevent")) or ""
    for line in uevent.splitlines():
        if line.startswith("DEVNAME="):
            return "/dev/" + line.split("=", 1)[1]
    raise MbrescueError(f"cannot tell which disk holds /boot ({boot.device}): name SOURCE")


# ---- the comparison --------------------------------------------------------------------------


@dataclass
class _Found:
    items: list[Difference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, kind: str, subject: str, line: str, volatile: bool = False) -> None:
        self.items.append(Difference(kind, subject, line, volatile))


def _span(part: Any) -> str:
    return f"sectors {part.start_lba}..{part.start_lba + part.size_sectors - 1}"


def _compare_table(manifest: Manifest, live: Layout, found: _Found) -> None:
    if live.table != manifest.table:
        found.add("table", "table", f"partition table changed from {manifest.table} to "
                                    f"{live.table}")
        return
    if live.disk_id.lower() != manifest.disk_id.lower():
        what = "disk GUID" if manifest.table == "gpt" else "disk id"
        found.add("table", "disk id", f"{what} changed: {manifest.disk_id} -> {live.disk_id}")
    now = {p.number: p for p in live.partitions}
    for old in manifest.partitions:
        name = f"partition {old.number}"
        new = now.pop(old.number, None)
        if new is None:
            found.add("partition", name, f"{name} removed (was {_span(old)}, type {old.type})")
            continue
        if (new.start_lba, new.size_sectors) != (old.start_lba, old.size_sectors):
            found.add("partition", name, f"{name} moved or resized: {_span(old)} -> {_span(new)}")
        if new.type.lower() != old.type.lower():
            found.add("partition", name, f"{name} type changed: {old.type} -> {new.type}")
        if (new.guid or "").lower() != (old.guid or "").lower():
            found.add("partition", name, f"{name} GUID changed: {old.guid} -> {new.guid}")
        if new.bootable != old.bootable:
            found.add("partition", name, f"{name} boot flag {'set' if new.bootable else 'cleared'}")
        if (new.name or "") != (old.name or ""):
            found.add("partition", name, f"{name} name changed: {old.name!r} -> {new.name!r}")
        if old.number in manifest.boot_chain or old.number in manifest.swap_numbers:
            _compare_fs(name, old.fs, new, found)
    for new in now.values():
        found.add("partition", f"partition {new.number}",
                  f"partition {new.number} added ({_span(new)}, type {new.type})")


def _compare_fs(name: str, old: Any, new: Partition, found: _Found) -> None:
    if old is None and new.fs is None:
        return
    if old is None or new.fs is None or old.type != new.fs.type:
        was = old.type if old is not None else "none"
        now = new.fs.type if new.fs is not None else "none"
        found.add("filesystem", name, f"{name} file system changed: {was} -> {now}")
        return
    if (old.uuid or "").lower() != (new.fs.uuid or "").lower():
        found.add("filesystem", name, f"{name} file system UUID changed: {old.uuid} -> "
                                      f"{new.fs.uuid}")
    if (old.label or "") != (new.fs.label or ""):
        was, now = repr(old.label) if old.label else "(none)", (
            repr(new.fs.label) if new.fs.label else "(none)")
        found.add("filesystem", name, f"{name} file system label changed: {was} -> {now}")


def _compare_sectors(manifest: Manifest, live: Layout, source: str, found: _Found) -> None:
    if manifest.mbr_boot_code_sha256 is not None and (
            live.mbr.boot_code_sha256 != manifest.mbr_boot_code_sha256):
        found.add("mbr", "MBR", "MBR boot code changed (bytes 0..439)")
    fingerprint = manifest.fingerprint
    if fingerprint is None:
        return
    sector = live.disk.logical_sector_bytes
    disk_sectors = live.disk.size_bytes // sector
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        gap = fingerprint.gap
        if gap is not None and gap.end_lba < disk_sectors:
            length = (gap.end_lba - gap.start_lba + 1) * sector
            if bootfiles.hash_range(fd, gap.start_lba * sector, length) != gap.sha256:
                found.add("gap", "post-MBR gap", f"post-MBR gap changed (sectors {gap.start_lba}"
                                                 f"..{gap.end_lba}: GRUB's core image)")
        now = {p.number: p for p in live.partitions}
        for raw in fingerprint.raw_partitions:
            old, new = manifest.partition(raw.partition), now.get(raw.partition)
            if new is None or (new.start_lba, new.size_sectors) != (old.start_lba,
                                                                   old.size_sectors):
                continue  # reported with the table
            digest = bootfiles.hash_range(fd, new.start_lba * sector, new.size_sectors * sector)
            if digest != raw.sha256:
                found.add("partition", f"partition {raw.partition}",
                          f"partition {raw.partition}'s content changed ({old.type_name or old.type}"
                          ", no file system: GRUB's core image)")
    finally:
        os.close(fd)


def _entry(data: dict[str, Any]) -> FileEntry:
    return FileEntry(path=data["path"], type=data["type"], size=data["size"], mode=data["mode"],
                     uid=data["uid"], gid=data["gid"], mtime=data["mtime"],
                     sha256=data["sha256"], target=data["target"])


def _compare_files(recorded: tuple[FileEntry, ...], live: list[FileEntry], shown: str,
                   found: _Found) -> None:
    now = {entry.path: entry for entry in live}
    before = {entry.path: entry for entry in recorded}
    for path in sorted(set(before) | set(now)):
        old, new = before.get(path), now.get(path)
        where = os.path.join(shown, path)
        volatile = bootfiles.is_volatile(path)

        def add(line: str, quiet: bool = volatile, path: str = path) -> None:
            found.add("file", path, line, quiet)

        if new is None:
            add(f"{where} removed")
        elif old is None:
            add(f"{where} added")
        elif old.type != new.type:
            add(f"{where} changed from a {old.type} to a {new.type}")
        else:
            if old.type == "file" and (old.size, old.sha256) != (new.size, new.sha256):
                add(f"{where} changed ({old.size} -> {new.size} bytes)" if old.size != new.size
                    else f"{where} changed (same size, other content)")
            elif old.type == "symlink" and old.target != new.target:
                add(f"{where} now points to {new.target} (was {old.target})")
            elif old.mtime != new.mtime and old.type == "file":
                # Same bytes, mode and owner come back from the capture: no reason to recapture.
                add(f"{where} modification time changed (content unchanged)", quiet=True)
            if old.mode != new.mode:
                add(f"{where} mode changed: {old.mode:04o} -> {new.mode:04o}")
            if (old.uid, old.gid) != (new.uid, new.gid):
                add(f"{where} owner changed: {old.uid}:{old.gid} -> {new.uid}:{new.gid}")


def _compare_kernels(manifest: Manifest, found: _Found) -> None:
    fingerprint = manifest.fingerprint
    assert fingerprint is not None
    for kernel in fingerprint.kernels:
        modules = os.path.join(bootfiles.MODULES_DIR, kernel.version)
        if kernel.modules and not os.path.isdir(modules):
            found.add("kernel", kernel.version,
                      f"kernel {kernel.version}: {modules} is gone since the capture (restored, "
                      "it would boot without its modules)")


def _boot_mount(source: str, live: Layout, number: int) -> Any:
    from ..freeze import partition_mounts

    starts = {p.number: p.start_lba for p in live.partitions if not p.is_extended}
    return partition_mounts(source, starts, live.disk.logical_sector_bytes).get(number)


def _region_unchanged(manifest: Manifest, source: str) -> bool:
    """SOURCE's first bytes are the captured region's, byte for byte."""
    length = manifest.region.length_bytes
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.lseek(fd, 0, os.SEEK_END) < length:
            return False
        return bootfiles.hash_range(fd, 0, length) == manifest.region.sha256
    finally:
        os.close(fd)


def _compare_boot_files(manifest: Manifest, copied: tuple[FileEntry, ...] | None, source: str,
                        live: Layout, found: _Found) -> int | None:
    """/boot's files, mounted or not, against the capture's; how many were compared."""
    from ..freeze import is_system_root

    fingerprint = manifest.fingerprint
    assert fingerprint is not None
    number = manifest.boot_partition
    name = f"partition {number}"
    recorded = fingerprint.files if fingerprint.files is not None else copied
    # A list from the copy holds symlinks to directories, the archive's list does not.
    dir_links = fingerprint.files is None
    mount = _boot_mount(source, live, number)
    if mount is not None and is_system_root(mount):
        found.notes.append(f"/boot's files not compared: {name} of {source} is the running "
                           "system's root file system")
        return None
    if mount is not None:
        if recorded is None:
            reason = fingerprint.files_reason or "the capture holds no list of them"
            found.notes.append(f"/boot's files not compared: {reason}")
            return None
        listed = [_entry(item) for item in bootfiles.list_live(mount.mountpoint,
                                                                dir_links=dir_links)]
        _compare_files(recorded, listed, mount.mountpoint, found)
        if fingerprint.live_host and mount.mountpoint == "/boot":
            _compare_kernels(manifest, found)
        return len(listed)
    part = next((p for p in live.partitions if p.number == number), None)
    if part is None:
        found.notes.append(f"/boot's files not compared: {source} has no {name} now")
        return None
    compared, why = _compare_unmounted(recorded, dir_links, source, part, live, found)
    if why is None:
        return compared
    # The bytes as captured are the files as captured: a disk nobody touched still matches.
    if _region_unchanged(manifest, source):
        found.notes.append(f"{name}'s files not compared ({why}), but the boot region's bytes "
                           "are as captured, and so are its files")
        return None
    found.add("unchecked", name, f"{name}'s files not compared: {why}; the boot region's bytes "
                                 "differ from the capture's, so it may have drifted")
    return None


def _compare_unmounted(recorded: tuple[FileEntry, ...] | None, dir_links: bool, source: str,
                       part: Partition, live: Layout, found: _Found) -> tuple[int, str | None]:
    """The files of an unmounted /boot, read on a read-only loop device mounted without
    replay (`ro,noload`; XFS `ro,norecovery`: runner/filecopy.py, as capture reads it):
    (how many were compared, None), or
    (0, why they could not be)."""
    if recorded is None:
        return 0, "the capture holds no list of them and no file-level copy"
    fs_type = part.fs.type if part.fs is not None else None
    if fs_type not in filecopy.MOUNTED_TYPES:
        return 0, f"no read-only mount for {'a ' + fs_type if fs_type else 'its'} file system here"
    offset_bytes = part.start_lba * live.disk.logical_sector_bytes
    with contextlib.ExitStack() as stack:
        try:
            where = stack.enter_context(filecopy.loop_mounted(source, offset_bytes, fs_type))
        except MbrescueError as exc:
            return 0, f"it is not mounted and cannot be mounted read-only here ({exc})"
        listed = [_entry(item) for item in bootfiles.list_live(os.fspath(where),
                                                                dir_links=dir_links)]
    _compare_files(recorded, listed, f"partition {part.number}:", found)
    return len(listed), None


def check(capture_path: str, source: str | None = None, *, strict: bool = False,
          sector_bytes: int | None = None) -> CheckReport:
    manifest, copied = _load(capture_path)
    source = source or default_source()
    if sector_bytes is None and os.path.exists(source) and stat.S_ISREG(os.stat(source).st_mode):
        sector_bytes = manifest.source.logical_sector_bytes
    live = read_layout(source, sector_bytes)
    found = _Found()
    _compare_table(manifest, live, found)
    _compare_sectors(manifest, live, source, found)
    files_compared = None
    if manifest.fingerprint is None:
        found.notes.append("the capture records no file list (made before `check` existed): "
                           "only the table, the MBR and the file systems were compared")
    else:
        files_compared = _compare_boot_files(manifest, copied, source, live, found)
    counted = [d for d in found.items if strict or not d.volatile]
    ignored = [d for d in found.items if not strict and d.volatile]
    return CheckReport(capture=capture_path, source=source, hostname=manifest.hostname,
                       created=manifest.created, strict=strict, differences=tuple(counted),
                       ignored=tuple(ignored), notes=tuple(found.notes),
                       files_compared=files_compared)


# ---- the command (host.py and cli.py both call `main_check`) ---------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("capture", help="a capture file, or a rescue ISO built from one")
    parser.add_argument("source", nargs="?", default=None,
                        help="boot disk or image file [the disk holding the mounted /boot]")
    parser.add_argument("--strict", action="store_true",
                        help="count grubenv and mtime-only changes too")
    parser.add_argument("--json", dest="as_json", action="store_true",
                        help="print the result as JSON")
    parser.add_argument("--sector-size", dest="sector_bytes", type=int, default=None,
                        help="logical sector size of an image SOURCE [the capture's]")


def summary(report: CheckReport) -> str:
    what = f"{report.hostname}'s capture of {report.created}"
    files = f", {report.files_compared} files" if report.files_compared is not None else ""
    if report.matches:
        return f"{what} still matches {report.source}{files}"
    return f"{what} no longer matches {report.source}: {len(report.differences)} difference(s)"


def main_check(capture: str, source: str | None, strict: bool, as_json: bool,
               sector_bytes: int | None = None) -> int:
    """Run the check and print it; the exit status (0 matches, 1 drifted or not comparable,
    2 error)."""
    try:
        report = check(capture, source, strict=strict, sector_bytes=sector_bytes)
    except (MbrescueError, OSError) as exc:
        if isinstance(exc, MbrescueError):
            line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            line += f" (hint: {exc.hint})" if exc.hint else ""
        else:
            line = f"{exc.filename}: " if exc.filename else ""
            line += f"{exc.strerror or exc}"
        print(printable(f"mbrescue: error: {line}"), file=sys.stderr)
        if as_json:  # a script reads stdout: the failure is there too
            print(json.dumps({"capture": capture, "source": source, "matches": False,
                              "exit_status": EXIT_ERROR, "error": line}, indent=1))
        return EXIT_ERROR
    if as_json:
        print(json.dumps({**report.to_json(), "error": None,
                          "exit_status": EXIT_MATCHES if report.matches else EXIT_DRIFTED},
                         indent=1))
    else:
        for difference in report.differences:
            print(printable(difference.line))
        for note in report.notes:
            print(printable(f"mbrescue: note: {note}"), file=sys.stderr)
        for difference in report.ignored:
            print(printable(f"mbrescue: ignored: {difference.line} (volatile; --strict counts it)"),
                  file=sys.stderr)
        print(f"mbrescue: {summary(report)}", file=sys.stderr)
    return EXIT_MATCHES if report.matches else EXIT_DRIFTED


HELP = ("compare SOURCE with a capture: exit 0 it matches, 1 it drifted or its files could not "
        "be compared (one line each), 2 error")


def run(args: argparse.Namespace) -> int:
    return main_check(args.capture, args.source, args.strict, args.as_json, args.sector_bytes)

