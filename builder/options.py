"""The arguments `capture` and `restore` take, written once for both command lines.

`mbrescue` (typer, builder/cli.py) and the host bundle (argparse, builder/host.py) build
these two commands from the tables below, so an option added to one exists in the other:
the bundle once lacked `restore --files` because each side listed its own. Standard
library only: the bundle carries this module.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """One argument: positional when `flags` is empty. `kind` is str, int, bool (a switch
    that is off unless given) or list (a string option that may be repeated). Help texts
    are sentences: typer shows them as they are, argparse too."""

    name: str
    flags: tuple[str, ...]
    help: str
    kind: type = str
    metavar: str | None = None
    path: bool = False  # names a file or device (typer: a Path; argparse: the string)

    @property
    def positional(self) -> bool:
        return not self.flags


CAPTURE: tuple[Option, ...] = (
    Option("source", (), "Boot disk (block device, e.g. /dev/sda) or disk image file.",
           path=True),
    Option("output", ("-o", "--output"), "Capture file, or a directory to write "
           "HOST.mbrescue into [./HOST.mbrescue].", metavar="PATH"),
    Option("boot_partition", ("--boot-partition",),
           "Number of the /boot partition (default: guessed).", int, metavar="N"),
    Option("hostname", ("--hostname",), "Host name to record.", metavar="NAME"),
    Option("sector_bytes", ("--sector-size",),
           "Logical sector size of an image file, in bytes [512].", int, metavar="BYTES"),
    Option("mac", ("--mac",), "A MAC address of the host's NICs to record (repeatable; picks "
           "its network-boot menu) [a block device: this machine's NICs; an image file: none].",
           list, metavar="MAC"),
    Option("as_json", ("--json",), "Print what was captured as one JSON object on stdout "
           "(file, host, region, the manifest's SHA-256).", bool),
)

RESTORE: tuple[Option, ...] = (
    Option("capture", (), "A capture file.", path=True),
    Option("target", (), "Disk (block device) or image file to write.", path=True),
    Option("yes", ("--yes",), "Do not ask; for scripts. DANGEROUS: TARGET is overwritten.",
           bool),
    Option("sector_bytes", ("--sector-size",),
           "Logical sector size of an image TARGET, in bytes [512].", int, metavar="BYTES"),
    Option("files", ("--files",), "Take the file-level path (new table, file systems made "
           "again) even where the region path would do.", bool),
)


def add_to_parser(parser: argparse.ArgumentParser, options: tuple[Option, ...]) -> None:
    """The table as argparse arguments (the bundle's command line)."""
    for option in options:
        if option.positional:
            parser.add_argument(option.name, help=option.help)
        elif option.kind is bool:
            parser.add_argument(*option.flags, dest=option.name, action="store_true",
                                help=option.help)
        elif option.kind is list:
            parser.add_argument(*option.flags, dest=option.name, action="append", default=None,
                                metavar=option.metavar, help=option.help)
        else:
            parser.add_argument(*option.flags, dest=option.name, type=option.kind, default=None,
                                metavar=option.metavar, help=option.help)
