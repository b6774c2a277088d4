"""Put a captured boot region back on a disk: plan, ask, write, adjust, verify.

The same code runs in the rescue system (`python3 -m mbrescue_runner rescue CAPTURE`,
every disk a candidate) and as `mbrescue restore CAPTURE TARGET` on any Linux. The
order of work follows DESIGN.md's safety rules: the capture's checksums are verified
before the first byte is written; every adjustment the target needs is decided
*before* writing (a partition that cannot fit refuses the restore, nothing written);
the plan is shown and only `yes` proceeds; the region is written with its in-region
adjustments (protective MBR, primary GPT header, shrunk MBR/EBR entries) patched into
the stream, the rest (GPT backup, EBRs outside the region, swap headers) after it;
then everything is read back from the device, past the page cache, and compared.
Every write is a pure function of the capture and the target's size, so running it
again after an interruption simply writes the same bytes.
"""

from __future__ import annotations

from .capfile import Capture
from .cmdline import OPTIONS_PATH, Switches, read_switches, unattended_allowed
from .console import Console
from .disk import disk_info, list_disks
from .errors import MbrescueError
from .plan import Plan, RegionHead, disk_title, plan_restore, show_capture, show_plan
from .targets import Candidate, base_refusal, matches, rank
from .writer import execute

CONFIRM_WORD = "yes"


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


def rescue_candidates(capture: Capture, head: RegionHead, medium: str | None
                      ) -> list[tuple[Candidate, Plan | None]]:
    """Every disk the kernel sees, ranked, each with its plan or the reason it is refused."""
    found: list[tuple[Candidate, Plan | None]] = []
    for listed in list_disks():
        try:
            disk = listed if listed.is_cdrom else disk_info(listed.path)
            disk.is_cdrom = disk.is_cdrom or listed.is_cdrom
        except MbrescueError as exc:
            found.append((Candidate(listed, 9, "", str(exc)), None))
            continue
        order, why = rank(disk, capture.manifest.source)
        candidate = Candidate(disk, order, why, base_refusal(disk, medium))
        plan = None
        if candidate.refusal is None:
            try:
                plan = plan_restore(capture, head, disk)
            except MbrescueError as exc:
                candidate.refusal = str(exc)
        found.append((candidate, plan))
    found.sort(key=lambda item: (item[0].rank, item[0].disk.size_bytes, item[0].disk.path))
    return found


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
) -> int:
    """Restore the capture onto `target` (CLI) or onto a disk chosen in the rescue system.

    Returns 0 when the restore completed and verified; raises MbrescueError (one line)
    for a refusal, an abort or a failure. `rescue=True` reads the kernel command line
    switches (unless given) and offers every disk but the boot medium.
    """
    if rescue and switches is None:
        switches = read_switches()
    switches = switches or Switches()
    medium = medium or switches.medium
    capture = Capture.open(capture_path)
    show_capture(console, capture)
    console.say("mbrescue: checking the capture's checksums ...")
    capture.verify()
    console.say(f"mbrescue: capture verified (region SHA-256 {capture.region.sha256[:16]}...)")
    head = RegionHead(capture)
    unambiguous = False
    if target is not None:
        disk = disk_info(target, sector_bytes)
        refusal = base_refusal(disk, medium)
        if refusal:
            raise MbrescueError(f"refusing {disk.path}: {refusal}")
        plan = plan_restore(capture, head, disk)
        unambiguous = True
    else:
        found = rescue_candidates(capture, head, medium)
        wanted = switches.target
        if wanted:
            chosen = [item for item in found if matches(item[0].disk, wanted)]
            if not chosen:
                names = ", ".join(c.disk.path for c, _ in found) or "none"
                raise MbrescueError(f"mbrescue.target={wanted} matches no disk (disks: {names})")
            candidate, maybe_plan = chosen[0]
            if candidate.refusal or maybe_plan is None:
                raise MbrescueError(f"refusing {candidate.disk.path}: {candidate.refusal}")
            plan = maybe_plan
            unambiguous = True
        else:
            for candidate, _ in found:
                if candidate.refusal:
                    console.say(f"  not offered: {candidate.disk.path}: {candidate.refusal}")
            offered = [(c, p) for c, p in found if p is not None and not c.refusal]
            if not offered:
                raise MbrescueError("no disk can take the region (see the reasons above)")
            if len(offered) == 1:
                plan = offered[0][1]  # type: ignore[assignment]
                unambiguous = True
            else:
                pick = _choose(console, [c for c, _ in offered])
                plan = next(p for c, p in offered if c is pick)  # type: ignore[misc]
    show_plan(console, plan)
    proceed = assume_yes
    if not proceed and switches.unattended:
        if not unattended_allowed(options_path):
            console.say("mbrescue: mbrescue.unattended=1 ignored: this rescue system was built "
                        "without the unattended opt-in")
        elif not unambiguous:
            console.say("mbrescue: mbrescue.unattended=1 ignored: more than one disk could be "
                        "the target")
        else:
            console.say(
                "mbrescue: unattended restore (mbrescue.unattended=1, allowed by the build)"
            )
            proceed = True
    if not proceed:
        answer = console.ask(
            f"Type {CONFIRM_WORD} to write {plan.target.path} "
            f"(sectors 0..{plan.region_sectors - 1} are overwritten): "
        )
        # Exactly the word: "y", "YES" or " yes" are not an informed consent to overwrite.
        if answer != CONFIRM_WORD:
            raise MbrescueError("aborted, nothing written")
    stats = execute(capture, plan, console)
    console.say(
        f"mbrescue: wrote {plan.region_bytes} bytes in {stats.write_seconds:.2f} s "
        f"({stats.write_mb_s:.1f} MB/s), verified in {stats.verify_seconds:.2f} s "
        f"({stats.verify_mb_s:.1f} MB/s, {stats.read_back})"
    )
    for line in plan.adjusted:
        console.say("mbrescue: adjusted: " + line)
    for line in plan.recreated:
        console.say("mbrescue: recreated: " + line)
    console.say(f"mbrescue: restore complete: {plan.target.path} holds the boot region of "
                f"{capture.manifest.hostname}")
    return 0
