"""Put a captured boot region back on a disk: plan, ask, write, adjust, verify.

The same code runs in the rescue system (`python3 -m mbrescue_runner rescue CAPTURE`,
every disk a candidate) and as `mbrescue restore CAPTURE TARGET` on any Linux. The
order of work follows the safety rules in docs/design.md: the capture's checksums are verified
before the first byte is written (the manifest's seal and every chunk a plan reads before the
plan; the whole capture on a second thread while the plan is on the screen, and the first
write waits for it); every adjustment the target needs is decided
*before* writing (a partition that cannot fit refuses the restore, nothing written);
the plan is shown and only `yes` proceeds; the region is written with its in-region
adjustments (protective MBR, primary GPT header, shrunk MBR/EBR entries) patched into
the stream, the rest (GPT backup, EBRs outside the region, swap headers) after it;
then everything is read back from the device, past the page cache, and compared.
Every write is a pure function of the capture and the target's size, so running it
again after an interruption simply writes the same bytes: an interrupted restore (Ctrl-C,
SIGTERM) says whether anything was written and, if so, the exact command that finishes it.

Which path: the region path when the target can take it (the captured logical sector size,
the whole region fits), else the file-level path (files_restore.py) — in the rescue system
exactly as `mbrescue restore` chooses, each candidate disk planned for its own path, and the
plan says which path and why. `mbrescue.files=1` (like `--files`) forces the file-level path.

Unattended mode (`mbrescue.unattended=1`, honoured only with the build's opt-in) writes
without asking only to a disk that is *identified*: named by `mbrescue.target=` (or the
TARGET argument), or carrying the captured disk's serial/WWN. A lone disk that is merely
large enough is not identified: it may be the wrong machine's data disk.
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from . import errors, files_restore, nvram, settle
from .capfile import Capture
from .cmdline import (
    OPTIONS_PATH,
    UNATTENDED_DONE_PATH,
    Switches,
    expected_capture_sha256,
    expected_manifest_sha256,
    read_switches,
    unattended_allowed,
)
from .console import Console
from .disk import DiskInfo, disk_info, list_disks
from .errors import DoesNotFit, MbrescueError
from .outputs import refuse_same_file
from .plan import (
    Plan,
    RegionHead,
    disk_title,
    plan_restore,
    prompt_text,
    show_capture,
    show_plan,
)
from .targets import (
    Candidate,
    base_refusal,
    identified,
    matches,
    order_key,
    rank,
    removable_note,
    unattended_choice,
)
from .writer import execute

# Set by /init: when its disk wait (mbrescue.wait=N) runs out, in seconds since boot.
WAIT_UNTIL_ENV = "MBRESCUE_WAIT_UNTIL"

CONFIRM_WORD = "yes"
# Why the file-level path was taken where the region path would do.
FORCED_BY_CLI = "--files"
FORCED_BY_CMDLINE = "mbrescue.files=1 on the kernel command line"
REGION_PATH_WHY = ("region path, because the disk has the captured sector size and holds the "
                   "whole region: the captured bytes are written back as they are")

# A candidate's plan: the region path's or the file-level path's.
AnyPlan = Plan | files_restore.FilesPlan


class Interrupted(errors.Interrupted):
    """Ctrl-C or SIGTERM: the message says whether the target was touched and how to finish."""


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends a restore as Ctrl-C does (with the resume hint), not silently."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (tests drive restore() from threads)
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cli_rerun(capture_path: str, sector_bytes: int | None, assume_yes: bool
              ) -> Callable[[str], list[str]]:
    """The `mbrescue restore` command line that repeats this restore onto a target."""
    def words(target: str) -> list[str]:
        extra = ["--sector-size", str(sector_bytes)] if sector_bytes else []
        return ["mbrescue", "restore", os.path.abspath(capture_path), os.path.abspath(target),
                *extra, *(["--yes"] if assume_yes else [])]
    return words


# --- the whole job -----------------------------------------------------------------------


def _choose(console: Console, offered: list[Candidate]) -> Candidate:
    console.say("Disks that can take the region:")
    for index, candidate in enumerate(offered, 1):
        console.say(f"  {index}) {disk_title(candidate.disk)} - {candidate.why}")
    while True:
        answer = console.ask(f"Restore onto which disk? Type its number (1..{len(offered)}), "
                             "or q to quit: ")
        if answer is None or answer.strip().lower() in ("q", "quit"):
            raise MbrescueError("aborted, nothing written")
        if answer.strip().isdigit() and 1 <= int(answer.strip()) <= len(offered):
            return offered[int(answer.strip()) - 1]
        console.say(f"'{answer.strip()}' is not one of the numbers shown.")


def files_reason(capture: Capture, disk: DiskInfo, forced_by: str | None) -> str | None:
    """Why this disk takes the file-level path (files_restore.why_files: another sector
    size, a disk smaller than the region), or that `forced_by` asked for it; None: region."""
    why = files_restore.why_files(capture.manifest, disk, False)
    if why is None and forced_by:
        why = f"asked for ({forced_by})"
    return why


def plan_for(capture: Capture, head: RegionHead, disk: DiskInfo,
             forced_by: str | None = None) -> AnyPlan:
    """The plan of the path this disk takes; raises MbrescueError for a refusal."""
    why = files_reason(capture, disk, forced_by)
    if why is None:
        try:
            return plan_restore(capture, head, disk)
        except DoesNotFit as exc:
            why = region_cannot(exc)
    return files_restore.plan_files(capture, disk, why)


def region_cannot(exc: DoesNotFit) -> str:
    """The file-level path's reason when the region path cannot lay the layout out."""
    return f"the region path cannot lay the captured layout on this disk ({exc})"


def rescue_candidates(capture: Capture, head: RegionHead, medium: str | None,
                      disks: list[str] | None = None, forced_by: str | None = None
                      ) -> list[tuple[Candidate, AnyPlan | None]]:
    """Every disk the kernel sees (or only `disks`), ranked, each with its plan (the region
    path's or the file-level path's) or the reason it is refused. `forced_by` names the
    switch that asks for the file-level path on every disk."""
    found: list[tuple[Candidate, AnyPlan | None]] = []
    listed_disks = list_disks() if disks is None else [disk_info(path) for path in disks]
    for listed in listed_disks:
        try:
            disk = listed if listed.is_cdrom else disk_info(listed.path)
            disk.is_cdrom = disk.is_cdrom or listed.is_cdrom
        except MbrescueError as exc:
            found.append((Candidate(listed, 9, "", str(exc)), None))
            continue
        order, why = rank(disk, capture.manifest.source)
        note = removable_note(disk)
        candidate = Candidate(disk, order, f"{why}, {note}" if note else why,
                              base_refusal(disk, medium))
        plan: AnyPlan | None = None
        if candidate.refusal is None:
            try:
                plan = plan_for(capture, head, disk, forced_by)
            except MbrescueError as exc:
                candidate.refusal = str(exc).removeprefix(f"refusing {disk.path}: ")
            if isinstance(plan, files_restore.FilesPlan):
                candidate.why += ", file-level path"
        found.append((candidate, plan))
    found.sort(key=lambda item: order_key(item[0]))
    return found


def _usable(found: list[tuple[Candidate, AnyPlan | None]], wanted: str | None) -> bool:
    if wanted:
        return any(matches(c.disk, wanted) for c, _ in found)
    return any(p is not None and not c.refusal for c, p in found)


def _wait_for_a_candidate(console: Console, capture: Capture, head: RegionHead,
                          medium: str | None, disks: list[str] | None, wanted: str | None,
                          forced_by: str | None = None
                          ) -> list[tuple[Candidate, AnyPlan | None]]:
    """The candidates, looked for again while none can take the region: as long as a
    controller is still scanning (runner/settle.py names it on the console), then for
    settle.QUIET_S more without a device event (a USB disk plugged in late), never past the
    rescue system's disk wait (`mbrescue.wait=N`, from /init); Enter on a console ends it."""
    found = rescue_candidates(capture, head, medium, disks, forced_by)
    try:
        until_s = float(os.environ.get(WAIT_UNTIL_ENV, ""))
    except ValueError:
        return found
    announced: list[str] | None = None
    seqnum = settle.uevent_seqnum()
    quiet_since = time.monotonic()
    while not _usable(found, wanted):
        left_s = until_s - time.clock_gettime(time.CLOCK_BOOTTIME)
        if left_s <= 0:
            console.say("mbrescue: the disk wait reached its limit (mbrescue.wait=N sets it)")
            break
        busy = settle.still_scanning()
        now_seqnum = settle.uevent_seqnum()
        if now_seqnum != seqnum:
            seqnum, quiet_since = now_seqnum, time.monotonic()
        if not busy and time.monotonic() - quiet_since >= settle.QUIET_S:
            break
        if busy != announced:
            if busy:
                console.say("mbrescue: no disk can take the region yet; waiting for the "
                            "controllers still scanning: " + "; ".join(busy))
            else:
                console.say("mbrescue: no disk can take the region yet; looking again "
                            f"for up to {min(left_s, settle.QUIET_S):.0f} s")
            console.say(f"mbrescue: Enter ends the wait (at most {left_s:.0f} s more; "
                        "mbrescue.wait=N sets the limit)")
            announced = busy
        if console.line_entered(1.0):
            console.say("mbrescue: the disk wait was ended by a key")
            found = rescue_candidates(capture, head, medium, disks, forced_by)
            break
        found = rescue_candidates(capture, head, medium, disks, forced_by)
    return found


INTERRUPTING_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class CaptureCheck:
    """The capture's whole verification, on a thread of its own while the plan is shown and
    the question asked (a person needs those seconds anyway); `wait` before the first write.

    Before it starts, the manifest is sealed (checked when the capture was opened) and the
    plan reads only chunks it checks one by one: nothing unchecked steers a write, and a
    mismatch found here still refuses with nothing written.
    """

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.error: MbrescueError | None = None
        self.seconds = 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="capture-check", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        # Signals go to the main thread only: one delivered here would not break the main
        # thread's blocking read at the prompt, and Ctrl-C would wait for the next key.
        signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTING_SIGNALS)
        started = time.monotonic()
        try:
            self.capture.verify()
        except MbrescueError as exc:
            self.error = exc
        except Exception as exc:  # an unreadable medium (OSError) and the like
            self.error = MbrescueError(f"the capture could not be checked: {exc}")
        finally:
            self.seconds = time.monotonic() - started
            self.done.set()

    def wait(self, console: Console) -> None:
        """Return once the whole capture is verified; raise (nothing written) if it is not."""
        if not self.done.is_set():
            console.say("mbrescue: finishing the capture's checksum check before the first "
                        "write ...")
        while not self.done.wait(0.2):  # short waits: Ctrl-C still reaches the main thread
            pass
        if self.error is not None:
            raise MbrescueError(f"{str(self.error).removesuffix('; nothing written')}; "
                                "nothing written")
        console.say(f"mbrescue: capture verified in {self.seconds:.1f} s (region SHA-256 "
                    f"{self.capture.region.sha256[:16]}...)")


def _unattended_proceeds(console: Console, switches: Switches, unattended: bool,
                         identity_known: bool, rescue: bool) -> bool:
    """Does `mbrescue.unattended=1` let this restore go on without `yes`? Says why not."""
    if not switches.unattended:
        return False
    if not unattended:
        console.say("mbrescue: mbrescue.unattended=1 ignored: this rescue system was built "
                    "without the unattended opt-in")
        return False
    if not identity_known:
        console.say("mbrescue: mbrescue.unattended=1 ignored: no disk has the captured "
                    "serial/WWN and mbrescue.target= names none (a disk that is merely "
                    "large enough is not proof)")
        return False
    console.say("mbrescue: unattended restore (mbrescue.unattended=1, allowed by the build)")
    _note_unattended(rescue)
    return True


def _note_unattended(rescue: bool) -> None:
    """In the rescue system, tell /init the restore goes on without a person: once it is
    complete, /init reboots into the restored disk by itself (templates/init.j2)."""
    if rescue:
        with open(UNATTENDED_DONE_PATH, "w", encoding="ascii") as marker:
            marker.write("1\n")


def restore(
    capture_path: str,
    target: str | None,
    *,
    console: Console,
    assume_yes: bool = False,
    rescue: bool = False,
    medium: str | None = None,
    sector_bytes: int | None = None,
    switches: Switches | None = None,
    options_path: str = OPTIONS_PATH,
    rerun: Callable[[str], list[str]] | None = None,
    disks: list[str] | None = None,
    files: bool = False,
) -> int:
    """Restore the capture onto `target` (CLI) or onto a disk chosen in the rescue system.

    Returns 0 when the restore completed and verified; raises MbrescueError (one line)
    for a refusal, an abort or a failure. `rescue=True` reads the kernel command line
    switches (unless given) and offers every disk but rescue media. `rerun(target)` is the
    command line that repeats the restore onto target (shown when a write is interrupted;
    default: `mbrescue restore ...`). `disks` limits the rescue mode's candidates to these
    paths (default: every disk the kernel lists). Ctrl-C or SIGTERM raises Interrupted.
    `files=True` (`--files`, or `mbrescue.files=1` among the switches) forces the file-level
    path.
    """
    if rescue and switches is None:
        switches = read_switches()
    files = files or (switches is not None and switches.files)
    rerun = rerun or cli_rerun(capture_path, sector_bytes, assume_yes)
    if files:  # the finishing command must take the same path
        plain_rerun = rerun

        def rerun(target: str) -> list[str]:
            return [*plain_rerun(target), "--files"]
    writing: list[str] = []  # the target, once the first write may have happened
    try:
        with _sigterm_interrupts():
            return _restore(capture_path, target, console=console, assume_yes=assume_yes,
                            rescue=rescue, medium=medium, sector_bytes=sector_bytes,
                            switches=switches, options_path=options_path, disks=disks,
                            writing=writing, files=files)
    except KeyboardInterrupt:
        if not writing:
            raise Interrupted("interrupted, nothing written") from None
        raise Interrupted(
            f"interrupted while writing {writing[0]}: the restore is incomplete; "
            f"to finish it, run: {shlex.join(rerun(writing[0]))}"
        ) from None


def _restore(
    capture_path: str,
    target: str | None,
    *,
    console: Console,
    assume_yes: bool,
    rescue: bool,
    medium: str | None,
    sector_bytes: int | None,
    switches: Switches | None,
    options_path: str,
    disks: list[str] | None,
    writing: list[str],
    files: bool = False,
) -> int:
    switches = switches or Switches()
    medium = medium or switches.medium
    if target is not None:
        refuse_same_file(capture_path, target, "the restore")
    capture = Capture.open(capture_path)
    show_capture(console, capture)
    if rescue:
        # The build's record of what it verified: the manifest's seal (every member's and
        # chunk's SHA-256 is in it), or from an older build the whole file's SHA-256.
        expected_manifest = expected_manifest_sha256(options_path)
        expected_file = expected_capture_sha256(options_path)
        if expected_manifest is not None:
            differs = capture.manifest_sha256 != expected_manifest
        else:
            differs = expected_file is not None and capture.file_sha256() != expected_file
        if differs:
            raise MbrescueError(
                "the capture in this rescue system is not the one the ISO was built with "
                "(its SHA-256 differs from the build's): the medium is damaged; nothing written"
            )
    capture.check_head()
    check = CaptureCheck(capture)
    console.say("mbrescue: checking the capture's checksums while the plan is made; nothing "
                "is written before that check has passed")
    head = RegionHead(capture)
    # Known to be the right disk (named, or the captured serial/WWN): unattended needs it.
    identity_known = False
    unattended = switches.unattended and unattended_allowed(options_path)
    plan: AnyPlan
    if target is not None:
        disk = disk_info(target, sector_bytes)
        refusal = base_refusal(disk, medium)
        if refusal:
            raise MbrescueError(f"refusing {disk.path}: {refusal}")
        why = files_restore.why_files(capture.manifest, disk, files)
        if why is None:
            try:
                plan = plan_restore(capture, head, disk)
            except DoesNotFit as exc:
                why = region_cannot(exc)
        if why is not None:
            check.wait(console)
            return files_restore.run(capture, disk, why, console, assume_yes, writing,
                                     firmware=rescue)
        identity_known = True
    else:
        wanted = switches.target
        forced_by = (FORCED_BY_CMDLINE if rescue else FORCED_BY_CLI) if files else None
        found = _wait_for_a_candidate(console, capture, head, medium, disks, wanted,
                                      forced_by)
        if wanted:
            chosen = [item for item in found if matches(item[0].disk, wanted)]
            if not chosen:
                names = ", ".join(c.disk.path for c, _ in found) or "none"
                raise MbrescueError(f"mbrescue.target={wanted} matches no disk (disks: {names})")
            candidate, maybe_plan = chosen[0]
            if candidate.refusal or maybe_plan is None:
                raise MbrescueError(f"refusing {candidate.disk.path}: {candidate.refusal}")
            plan = maybe_plan
            identity_known = True
        else:
            for candidate, _ in found:
                if candidate.refusal:
                    console.say(f"  not offered: {candidate.disk.path}: {candidate.refusal}")
            offered = [(c, p) for c, p in found if p is not None and not c.refusal]
            if not offered:
                raise MbrescueError("no disk can take the region (see the reasons above)")
            if len(offered) == 1:
                plan = offered[0][1]  # type: ignore[assignment]  # offered: plan not None
                identity_known = identified(offered[0][0])
            else:
                sure = unattended_choice([c for c, _ in offered]) if unattended else None
                pick = sure or _choose(console, [c for c, _ in offered])
                identity_known = sure is not None
                plan = next(p for c, p in offered if c is pick)  # type: ignore[misc]
    if isinstance(plan, files_restore.FilesPlan):
        # files_restore.run makes the file systems in scratch, shows its plan, asks (unless
        # told to proceed), writes and verifies; the checksums were verified above.
        proceed = assume_yes or _unattended_proceeds(console, switches, unattended,
                                                     identity_known, rescue)
        # The file systems are made from the capture's file copies: checked ones only.
        check.wait(console)
        return files_restore.run(capture, plan.target, plan.why, console, proceed, writing,
                                 firmware=rescue)
    show_plan(console, plan)
    console.say("  Restore path: " + REGION_PATH_WHY)
    # The rescue system boots on the machine the disk is for: its firmware's boot entry.
    entry = (nvram.plan_for_target(nvram.esp_of(capture.manifest), plan.target.path,
                                   plan.target.kind) if rescue else None)
    if entry is not None:
        console.say(entry.plan_line())
    proceed = assume_yes or _unattended_proceeds(console, switches, unattended, identity_known,
                                                 rescue)
    if not proceed:
        answer = console.ask(prompt_text(plan, CONFIRM_WORD))
        # Exactly the word: "y", "YES" or " yes" are not an informed consent to overwrite.
        if answer != CONFIRM_WORD:
            raise MbrescueError("aborted, nothing written")
    check.wait(console)
    writing.append(plan.target.path)
    stats = execute(capture, plan, console)
    console.say(
        f"mbrescue: wrote {plan.region_bytes} bytes in {stats.write_seconds:.2f} s "
        f"({stats.write_mib_s:.1f} MiB/s), verified in {stats.verify_seconds:.2f} s "
        f"({stats.verify_mib_s:.1f} MiB/s, {stats.read_back})"
    )
    for line in plan.adjusted:
        console.say("mbrescue: adjusted: " + line)
    for line in plan.recreated:
        console.say("mbrescue: recreated: " + line)
    for item in plan.erase:
        console.say("mbrescue: erased: stale " + item.text(plan.sector_bytes))
    # Last, once the disk is written and verified; before the completion line, which
    # scripts take as the end (a refused entry does not fail the restore: nvram.finish).
    nvram.finish(console, entry)
    console.say(f"mbrescue: restore complete: {plan.target.path} holds the boot region of "
                f"{capture.manifest.hostname}")
    return 0
