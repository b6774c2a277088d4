"""`mbrescue build`: one hybrid rescue ISO per capture.

The host-independent parts (kit, base initramfs, GRUB images' inputs) come from
caches keyed by their inputs, so a per-host build only makes the small payload
member, the GRUB images for its medium id, and the ISO. Several captures build in
parallel (`--jobs`), after the shared parts were made once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import buildrecord, log
from .debs import sha256_file
from .errors import MbrescueError
from .grub import (
    DEFAULT_SERIAL,
    SerialPort,
    check_grub_installed,
    make_grub_images,
    render_grub_cfg,
)
from .initramfs import make_base_initramfs, make_payload_initramfs
from .iso import IsoReport, iso_volume_label, new_medium_id, write_iso
from .kit import Kit, ensure_kit
from .run import require_tools
from .runner import agecrypt, bootloader
from .runner.capfile import Capture
from .runner.cmdline import options_json
from .runner.outputs import (
    check_hostname,
    check_output_dir,
    check_output_file,
    check_parent_dir,
    refuse_same_file,
)
from .verify import plaintext_pieces, verify_iso

PACKAGE_DIR = Path(__file__).resolve().parent
RUNNER_DIR = PACKAGE_DIR / "runner"
OVERLAYS_DIR = PACKAGE_DIR.parent / "overlays"


@dataclass(frozen=True)
class BuildOptions:
    captures: tuple[Path, ...]
    output: Path | None = None  # a file (one capture) or a directory
    jobs: int = 1
    unattended_allowed: bool = False
    # --expect-host: the host each capture must be for, in the captures' order (empty: any).
    expected_hosts: tuple[str, ...] = ()
    serial: SerialPort = DEFAULT_SERIAL  # --serial: GRUB's and the rescue kernel's serial line
    # --unattended-default SECONDS: with no local /boot found, GRUB starts the unattended
    # restore after this countdown (needs unattended_allowed).
    unattended_default_s: int | None = None
    # --encrypt: the payload's capture is stored age-encrypted with this passphrase (the
    # kernel, the rescue system and GRUB stay public). Never shown in a repr.
    passphrase: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class SharedParts:
    kit: Kit
    base_initrd: Path


def open_capture(path: Path) -> Capture:
    """Open a capture: its manifest parsed and sealed, its tables checked (cheap: the
    region's head only). The bulk of its bytes is checked by `check_capture_data`."""
    capture = Capture.open(os.fspath(path))
    capture.check_tables(b"")
    return capture


def check_capture_data(path: Path, capture: Capture) -> str:
    """Verify every byte of an opened capture; returns the file's SHA-256.

    The chunks are checked (check_capture_chunks) and the file is hashed whole beside
    them, through the same descriptor (the rescue system checks that the capture it
    reads has this SHA-256, and the whole-region SHA-256 again before it writes).
    """
    with ThreadPoolExecutor(1) as hasher:
        file_sha256 = hasher.submit(capture.file_sha256)
        check_capture_chunks(path, capture)
        return file_sha256.result()


def check_capture_chunks(path: Path, capture: Capture) -> None:
    """Every gzip member's SHA-256 checked and every member inflated (which checks its
    CRC-32 and length) on all cores; the other members' SHA-256."""
    expected = capture.region.chunk_sha256

    def check(item: tuple[int, bytes]) -> int:
        index, packed = item
        if hashlib.sha256(packed).hexdigest() != expected[index]:
            raise MbrescueError(f"{path}: checksum mismatch in region chunk {index}")
        return len(capture.unpack(index, packed))

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        length = sum(pool.map(check, enumerate(capture.compressed_chunks())))
    if length != capture.region.length_bytes:
        raise MbrescueError(
            f"{path}: the region is {length} bytes, the manifest says "
            f"{capture.region.length_bytes}"
        )
    capture.verify_members()


def check_expected_names(expected: tuple[str, ...], captures_given: int) -> None:
    """--expect-host's own checks, before any capture is read: one name per capture."""
    if expected and len(expected) != captures_given:
        raise MbrescueError(
            f"--expect-host given {len(expected)} time(s) for {captures_given} captures: "
            "give one per capture, in the captures' order"
        )
    for name in expected:
        try:
            check_hostname(name)
        except MbrescueError as exc:
            raise MbrescueError(f"--expect-host: {exc}") from None


def check_expected_hosts(captures: Sequence[tuple[Path, Capture]],
                         expected: tuple[str, ...]) -> None:
    """A capture is for the host the caller expects (--expect-host), or nothing is built.

    The host name inside a capture names its ISO, its network-boot payload and menu; a
    compromised host can write any name there (docs/design.md, safety rule 8). The controller knows
    which host it fetched each capture from: a capture claiming another name would
    replace that host's outputs, so it is refused before anything is written."""
    if not expected:
        return
    check_expected_names(expected, len(captures))
    for (path, capture), name in zip(captures, expected, strict=True):
        claimed = capture.manifest.hostname
        if claimed != name:
            raise MbrescueError(
                f"{path}: the capture is for host {claimed!r}, not {name!r} (--expect-host): "
                f"nothing built, neither {name}'s outputs nor {claimed}'s"
            )


def check_capture(path: Path) -> Capture:
    """Open and verify a capture: a corrupt one is refused before anything is written."""
    capture = open_capture(path)
    check_capture_data(path, capture)
    return capture


def output_path(options: BuildOptions, capture: Capture) -> Path:
    name = f"{capture.manifest.hostname}-rescue.iso"
    if options.output is None:
        return check_output_file(Path.cwd() / name)
    if options.output.is_dir() or len(options.captures) > 1:
        return check_output_file(options.output / name)
    return check_output_file(options.output)


def kernel_package(kit: Kit) -> tuple[str, str]:
    """(package, version) of the kit's kernel, for the build record."""
    names = [name for name in kit.packages if name.startswith("linux-image-")]
    if len(names) != 1:
        raise MbrescueError(f"the kit names {len(names)} kernel packages, not one")
    return names[0], kit.packages[names[0]]


def prepare_shared() -> SharedParts:
    # Every tool and GRUB platform first, before minutes of kit work.
    require_tools("grub-mkimage", "mkfs.vfat", "mcopy", "zstd", "dpkg-deb")
    check_grub_installed()
    kit = ensure_kit()
    base = make_base_initramfs(kit, RUNNER_DIR, OVERLAYS_DIR)
    return SharedParts(kit, base)


def build_one(
    capture_path: Path,
    capture: Capture,
    options: BuildOptions,
    shared: SharedParts,
    summed: Callable[[], str] | None = None,
    checked: Callable[[], None] | None = None,
) -> IsoReport:
    """One ISO. `summed` waits for the capture file's SHA-256 (through its descriptor);
    `checked` waits for the check of its data (and of the other captures of the build),
    which runs beside the GRUB images, the payload and the ISO's writing: the ISO gets
    its name only after it has passed, and after the written file's own check. Without
    them the capture is checked here, first."""
    # Said at once: the checks, the GRUB images and the ISO's writing take seconds.
    log.info(f"building {output_path(options, capture)} ({capture.manifest.hostname}, "
             f"capture {log.human_bytes(capture.size)}): checking the capture while the "
             "ISO is written ...")
    if summed is None or checked is None:
        capture_sha256 = check_capture_data(capture_path, capture)

        def summed() -> str:
            return capture_sha256

        def checked() -> None:
            return None

    manifest = capture.manifest
    if manifest.boot_loader and bootloader.no_boot_code(r.method for r in manifest.boot_loader):
        log.info(f"warning: {capture_path}: {bootloader.NO_BOOT_CODE_WARNING}")
    out = output_path(options, capture)
    check_parent_dir(out)
    boot_fs_uuid = manifest.boot_fs.uuid if manifest.boot_fs else None
    if not boot_fs_uuid:
        raise MbrescueError(
            f"{capture_path}: the captured /boot has no file system UUID to look for at boot"
        )
    # The medium id names this ISO (GRUB's search skips it, the runner never writes to it):
    # derived from the inputs, so a rebuild of the same capture is byte-identical.
    medium_id = new_medium_id(
        manifest.region.sha256, manifest.created, shared.base_initrd.name
    )
    with tempfile.TemporaryDirectory(prefix="mbrescue-build-") as tmp:
        work = Path(tmp)
        # GRUB's images do not need the capture's bytes checked (they go into the
        # temporary folder only): they are made while the check runs.
        grub = make_grub_images(work, medium_id=medium_id)
        # The capture's SHA-256 travels beside it: the rescue system checks the capture it
        # reads is, byte for byte, the one this build verified.
        capture_sha256 = summed()
        payload_capture, payload_sha256 = capture_path, capture_sha256
        encrypted_sha256 = None
        if options.passphrase is not None:
            # From the descriptor the check hashed: the bytes encrypted are the bytes checked.
            payload_capture = work / "capture.age"
            agecrypt.encrypt(capture.fd, capture.base, capture.size,
                             os.fspath(payload_capture), options.passphrase)
            payload_sha256 = encrypted_sha256 = sha256_file(payload_capture)
        # The manifest's SHA-256 too: it names every member's and chunk's SHA-256, so the
        # rescue system needs no pass over the whole file before it can show the plan.
        options_file = options_json(options.unattended_allowed, capture_sha256,
                                    capture.manifest_sha256, encrypted_sha256)
        payload = make_payload_initramfs(
            payload_capture, work / "payload.img", extra={"options.json": options_file}
        )
        plaintext = (plaintext_pieces(capture, (shared.kit.kernel, shared.base_initrd))
                     if encrypted_sha256 else ())
        grub_cfg = render_grub_cfg(
            host=manifest.hostname,
            captured_at=manifest.created,
            region_size=log.human_bytes(manifest.region.length_bytes),
            boot_fs_uuid=boot_fs_uuid,
            medium_id=medium_id,
            serial=options.serial,
            unattended_default_s=options.unattended_default_s,
        )
        found: dict = {}

        def before_rename(written: Path) -> None:
            checked()  # every capture of the build checked
            started = time.monotonic()
            found["written"] = written_checks(written, payload_sha256, out, plaintext)
            found["seconds"] = time.monotonic() - started

        report = write_iso(
            out,
            grub=grub,
            kernel=shared.kit.kernel,
            base_initrd=shared.base_initrd,
            payload=payload,
            options_json=options_file,
            build_record=buildrecord.make_record(
                buildrecord.signed_files(shared.kit.kernel, *kernel_package(shared.kit), grub)
            ),
            grub_cfg=grub_cfg,
            # Joliet stores the label in UTF-16: 16 characters at most.
            volume_label=iso_volume_label(manifest.hostname)[:16],
            medium_id=medium_id,
            before_rename=before_rename,
        )
    boots, checked_words = found["written"]
    return dataclasses.replace(report, boots=boots, checked=checked_words,
                               check_seconds=found["seconds"], host=manifest.hostname,
                               capture=capture_path, capture_sha256=summed(),
                               manifest_sha256=capture.manifest_sha256)  # fmt: skip


def report_json(report: IsoReport) -> dict[str, object]:
    """One ISO for `build --json`: whose, from which capture, and what its check found."""
    return {
        "iso": str(report.path),
        "host": report.host,
        "capture": str(report.capture) if report.capture else None,
        "capture_sha256": report.capture_sha256,
        "manifest_sha256": report.manifest_sha256,
        "size_bytes": report.size_bytes,
        "verified": list(report.checked),
        "boots": list(report.boots),
    }


# What the summary may say: each boot way needs the parts that a check of the written
# file found, not what the build meant to write.
BOOT_WAYS = (
    ("BIOS CD", ("El Torito BIOS entry",)),
    ("UEFI CD", ("El Torito EFI entry",)),
    ("BIOS USB", ("El Torito BIOS entry", "hybrid MBR (GRUB)")),
    ("UEFI USB", ("El Torito EFI entry", "partition table")),
)
CHECKED_WORDS = {
    "El Torito BIOS entry": "El Torito BIOS entry (GRUB, boot info table)",
    "El Torito EFI entry": "El Torito EFI entry (FAT image with EFI/BOOT/BOOTX64.EFI)",
    "hybrid MBR (GRUB)": "hybrid MBR (GRUB's boot_hybrid.img)",
    "partition table": "GPT with an ESP on the EFI image",
    "payload checksum": "payload with the checked capture",
    "no plaintext capture": "the capture only as age ciphertext (no plaintext in the ISO)",
}


def written_checks(path: Path, capture_sha256: str, name: Path | None = None,
                   plaintext: tuple[bytes, ...] = ()
                   ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Check a written ISO as `mbrescue verify` does: (the boot ways, the parts found).

    The capture inside must be the very file the build checked (its SHA-256; for an
    encrypted build, the encrypted file's), and none of `plaintext` may be anywhere in it.
    A failure is raised naming the ISO as `name` (its final name; `path` may be a
    temporary one).
    """
    checks = verify_iso(path, capture_sha256=capture_sha256, plaintext=plaintext)
    failed = [check for check in checks if not check.ok]
    if failed:
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise MbrescueError(
            f"{name or path} failed its check after writing and was removed: "
            f"{failed[0].name}: {failed[0].detail}{more}"
        )
    passed = {check.name for check in checks}
    return (tuple(way for way, needs in BOOT_WAYS if all(n in passed for n in needs)),
            tuple(words for n, words in CHECKED_WORDS.items() if n in passed))


def check_written(report: IsoReport, capture_sha256: str) -> IsoReport:
    """written_checks on a finished ISO; the report says what was found. An ISO that fails
    is removed, so nobody burns it."""
    started = time.monotonic()
    try:
        boots, checked = written_checks(report.path, capture_sha256)
    except MbrescueError:
        report.path.unlink(missing_ok=True)
        raise
    return dataclasses.replace(report, boots=boots, checked=checked,
                               check_seconds=time.monotonic() - started)


def unattended_line(options: BuildOptions) -> str | None:
    """What the build says plainly when its ISOs can restore without a person."""
    if options.unattended_default_s is not None:
        return (f"these ISOs RESTORE WITHOUT A PERSON: on a machine whose /boot is not found, "
                f"GRUB starts the unattended restore after {options.unattended_default_s} s, "
                "which writes only the disk with the captured serial/WWN (any other disk stops "
                "at the prompt)")
    if options.unattended_allowed:
        return ("these ISOs can restore without a person when mbrescue.unattended=1 is added "
                "on the kernel command line (--allow-unattended)")
    return None


def build(options: BuildOptions) -> list[IsoReport]:
    if not options.captures:
        raise MbrescueError("no capture given")
    if options.unattended_default_s is not None and not options.unattended_allowed:
        raise MbrescueError("--unattended-default needs --allow-unattended")
    check_expected_names(options.expected_hosts, len(options.captures))
    if options.passphrase is not None:
        agecrypt.check_passphrase(options.passphrase)
        require_tools("age")
    captures = [(path, open_capture(path)) for path in options.captures]
    check_expected_hosts(captures, options.expected_hosts)
    names = [output_path(options, capture) for _, capture in captures]
    for name in names:
        for path in options.captures:
            refuse_same_file(path, name, "the ISO")
        if name.parent.is_dir():
            check_output_dir(name.parent)
    if len(set(names)) != len(names):
        raise MbrescueError(
            "two captures are for the same host name; build them into different directories"
        )
    # Every capture's bytes are checked on other threads while the shared parts, GRUB
    # images, payloads and ISOs are made; every check has passed before the first ISO
    # gets its name (a failed one leaves none behind).
    with (ThreadPoolExecutor(1) as hasher,  # one at a time, each read once
          ThreadPoolExecutor(1) as checker):  # one at a time, each on all cores
        sums = [hasher.submit(capture.file_sha256) for _, capture in captures]
        checks = [checker.submit(check_capture_chunks, path, capture)
                  for path, capture in captures]

        def all_checked() -> None:
            for check in checks:
                check.result()

        shared = prepare_shared()
        with ThreadPoolExecutor(max(1, options.jobs)) as pool:
            futures = [
                pool.submit(build_one, path, capture, options, shared, sums[index].result,
                            all_checked)
                for index, (path, capture) in enumerate(captures)
            ]
            return [future.result() for future in futures]


def summary(report: IsoReport) -> str:
    """What was written and what a check of the written file found in it."""
    boots = ", ".join(report.boots) if report.boots else "nothing (not checked)"
    checked = "; ".join(report.checked) if report.checked else "nothing"
    return (
        f"{report.path}: {log.human_bytes(report.size_bytes)} in {report.seconds:.1f} s; "
        f"checked in the written file ({report.check_seconds:.1f} s): {checked}; "
        f"boots {boots}"
    )
