"""`make bench`, fleet section: many per-host ISOs at once, and one network-boot tree.

The hosts: one real capture of each fixture (`mbrescue capture --hostname`), then for each of
the HOSTS host names a copy re-sealed through the capture writer with its own host name and
its own creation time (so its own medium id, so GRUB images no build has made). The copy's
region, file copies and GPT tail are the captured bytes, member for member; only the
manifest changes, and it is sealed again as `capture` seals it. Opening each copy with the
capture reader (manifest seal, member sizes) and the build's own check of every byte
keep this honest: a copy that is not a capture fails the bench.

Measured, each run into a new directory:

- `mbrescue build --jobs 2` of all hosts, cold: a cache directory whose kit is the
  machine's (downloading and unpacking Debian packages is once per machine) but with no
  base initramfs and no GRUB images yet, so everything a fleet's first build makes is made;
- the same `mbrescue build --jobs 2` again, right after, warm: base and every host's GRUB
  images cached (the progress lines say what each run made, so a run that was not warm
  says so);
- `grub-mkrescue` run once per host, back to back, with the same kernel, base initramfs
  and each host's payload (the payloads made untimed);
- `mbrescue build --netboot DIR` of the same hosts, and the tree's size beside the ISOs'.

The private cache also keeps the bench's GRUB images (about 8 MiB a host) out of the
user's cache; it goes with the bench's temporary directory.
"""

from __future__ import annotations

import datetime
import json
import os
import tarfile
import time
from pathlib import Path

from .bench import BUILD_GOAL, MiB, grub_mkrescue, mbrescue_run, mkrescue_tree, ratio_row

HOSTS = 50
JOBS = 2
# The cache entries that stay the machine's: the kit and what it is made from.
SHARED_CACHE = ("debs", "extracted", "kit", "fixtures")


def private_cache(folder: Path) -> dict[str, str]:
    """An environment whose MBRESCUE_CACHE shares the kit but starts without base
    initramfs and GRUB images."""
    from .debs import cache_dir

    machine = cache_dir()
    cache = folder / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for name in SHARED_CACHE:
        if (machine / name).exists() and not (cache / name).exists():
            (cache / name).symlink_to(machine / name)
    return {**os.environ, "MBRESCUE_CACHE": os.fspath(cache)}


def reseal(seed: Path, out: Path, hostname: str, created: str) -> Path:
    """A copy of the capture `seed` for another host: every member as captured, the
    manifest with its host name and creation time, sealed again by the capture writer."""
    from .runner import capfile

    with tarfile.open(seed, "r:") as archive:
        members = [info for info in archive if info.isfile()]
        manifest = json.loads(archive.extractfile(capfile.MANIFEST_MEMBER).read())  # type: ignore[union-attr]
        manifest["hostname"] = hostname
        manifest["created"] = created
        mtime = int(time.time())
        with open(out, "wb") as stream:
            tar = capfile.TarWriter(stream)
            for info in members:
                if info.name in (capfile.MANIFEST_MEMBER, capfile.MANIFEST_SEAL_MEMBER):
                    continue
                source = archive.extractfile(info)
                assert source is not None
                with tar.member(info.name, mtime) as member:
                    while piece := source.read(4 * MiB):
                        member.write(piece)
            capfile.write_manifest(tar, manifest, mtime)
            tar.close()
    os.chmod(out, 0o600)
    with capfile.Capture.open(os.fspath(out)) as opened:  # sealed and sized as a capture
        if opened.manifest.hostname != hostname:
            raise RuntimeError(f"{out}: the re-sealed copy does not name {hostname}")
    return out


def fleet_captures(folder: Path, hosts: int) -> list[Path]:
    """`hosts` captures with distinct host names and creation times, from the fixtures."""
    from .fixtures import ensure_all

    seeds = []
    for name, fixture in sorted(ensure_all().items()):
        seed = folder / f"seed-{name}.mbrescue"
        seed.unlink(missing_ok=True)
        mbrescue_run("capture", fixture.path, "-o", seed, "--boot-partition",
                     str(fixture.boot_partition), "--hostname", f"seed-{name.lower()}")
        seeds.append(seed)
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    captures = []
    for index in range(hosts):
        created = (now - datetime.timedelta(seconds=index)).strftime("%Y-%m-%dT%H:%M:%SZ")
        captures.append(reseal(seeds[index % len(seeds)], folder / f"host{index:02d}.mbrescue",
                               f"fleet-{index:02d}", created))
    return captures


def made(build_log: str) -> str:
    """What a build made rather than took from the cache, from its progress lines."""
    base = build_log.count("building the rescue system's base initramfs")
    grub = build_log.count("making GRUB images")
    return f"base initramfs {base}x, GRUB images {grub}x"


def _tree_bytes(tree: Path) -> int:
    return sum(path.stat().st_size for path in tree.rglob("*") if path.is_file()
               and not path.is_symlink())


def _per_minute(count: int, seconds: float) -> str:
    return f"{count / seconds * 60:5.1f} ISOs/min"


def bench_fleet(work: Path, hosts: int = HOSTS, jobs: int = JOBS) -> list[str]:
    from .initramfs import make_payload_initramfs

    folder = work / "fleet-bench"
    folder.mkdir(parents=True, exist_ok=True)
    captures = fleet_captures(folder, hosts)
    env = private_cache(folder)
    capture_bytes = sum(path.stat().st_size for path in captures)

    def build(run: str) -> tuple[float, int, str]:
        out = folder / f"iso-{run}"
        out.mkdir()
        started = time.perf_counter()
        result = mbrescue_run("build", "--jobs", str(jobs), "-o", out, *captures, env=env)
        seconds = time.perf_counter() - started
        isos = sorted(out.glob("*.iso"))
        if len(isos) != hosts:
            raise RuntimeError(f"build --jobs {jobs} wrote {len(isos)} ISOs for {hosts} hosts")
        return seconds, sum(iso.stat().st_size for iso in isos), made(result.stderr)

    cold_s, iso_bytes, cold_made = build("cold")
    cached_grub = len(list((Path(env["MBRESCUE_CACHE"]) / "grub").glob("*/.complete")))
    if cached_grub < hosts:
        raise RuntimeError(f"the cold build made GRUB images for {cached_grub} of {hosts} hosts")

    # Warm right after cold: the base initramfs's key (and with it every medium id, so every
    # GRUB image's) follows the runner's files, which must not change in between.
    warm_s, _, warm_made = build("warm")

    tree = mkrescue_tree(folder)
    payloads = folder / "payloads"
    payloads.mkdir()
    for index, capture in enumerate(captures):  # untimed, as in the build section
        make_payload_initramfs(capture, payloads / f"{index:02d}.img")
    mkrescue_out = folder / "mkrescue"
    mkrescue_out.mkdir()
    mkrescue_s = 0.0
    mkrescue_bytes = 0
    for index in range(hosts):
        (tree / "payload.img").unlink(missing_ok=True)
        os.link(payloads / f"{index:02d}.img", tree / "payload.img")
        iso = mkrescue_out / f"{index:02d}.iso"
        started = time.perf_counter()
        grub_mkrescue(tree, iso)
        mkrescue_s += time.perf_counter() - started
        mkrescue_bytes += iso.stat().st_size

    netboot = folder / "netboot"
    started = time.perf_counter()
    mbrescue_run("build", "--netboot", netboot, *captures, env=env)
    netboot_s = time.perf_counter() - started
    netboot_bytes = _tree_bytes(netboot)

    rebuilt = ("" if warm_made == made("") else
               "  (NOT warm: the runner's or the kit's files changed between the runs, so the "
               "base initramfs's key, every medium id and every GRUB image's key did; rerun "
               "on a quiet tree)")
    return [
        f"fleet: {hosts} hosts ({capture_bytes / MiB:.0f} MiB of captures, from the fixtures, "
        f"distinct host names and creation times), each run into a new directory:",
        f"  mbrescue run 1  build --jobs {jobs}, cold (no base initramfs, no GRUB images "
        f"cached; kit warm) {cold_s:7.2f} s  {_per_minute(hosts, cold_s)}; made: {cold_made}",
        f"  mbrescue run 2  build --jobs {jobs}, warm (base and each host's GRUB images cached) "
        f"{warm_s:7.2f} s  {_per_minute(hosts, warm_s)}; made: {warm_made}",
        f"  grub-mkrescue   x {hosts} back to back (same kernel, base, payloads) "
        f"{mkrescue_s:7.2f} s  {_per_minute(hosts, mkrescue_s)}",
        "  " + ratio_row(f"{hosts} ISOs, build --jobs {jobs} cold / grub-mkrescue x {hosts}:",
                         cold_s, mkrescue_s, BUILD_GOAL),
        f"  {hosts} ISOs, build --jobs {jobs} warm / grub-mkrescue x {hosts}: "
        f"{warm_s / mkrescue_s:4.2f}x",
        f"  the cache's effect: warm / cold {warm_s / cold_s:4.2f}x "
        f"({cold_s - warm_s:.2f} s saved){rebuilt}",
        f"  network-boot tree for the same {hosts} hosts (build --netboot DIR, cache warm): "
        f"{netboot_s:.2f} s, {netboot_bytes / MiB:.0f} MiB vs {iso_bytes / MiB:.0f} MiB for "
        f"the {hosts} ISOs ({netboot_bytes / iso_bytes:4.2f}x; grub-mkrescue's "
        f"{mkrescue_bytes / MiB:.0f} MiB)",
    ]
