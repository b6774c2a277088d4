"""Reading tar archives from a capture: extended headers bounded before tarfile parses them.

A capture may come from a compromised host, and tarfile reads an extended header (a PAX
record set, a GNU long name or link name) whole before the member it describes is seen.
"""

from __future__ import annotations

import tarfile

from .errors import MbrescueError

# Extended headers (PAX records, GNU long names and link names) are parsed whole by tarfile
# before a member is seen, and CPython's PAX parsing was quadratic in the header's size
# (CVE-2024-6232: a 160 KB header took `inspect` 35 s; fixed in 3.8.20, 3.9.20, 3.10.15,
# 3.11.10, 3.12.6 and 3.13.0). The tool's own headers hold at most a path and a link target
# (4096 bytes each) and a few numbers: anything over this is refused before tarfile reads it,
# whatever Python runs (the rescue kit's Debian 3.11.2 among them).
TAR_EXTENDED_HEADER_MAX_BYTES = 16 << 10
_EXTENDED_TYPES = frozenset((tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                             tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK))


# A file-level copy's PAX records also carry a reference's extent list: at most
# filecopy.MAX_EXTENTS (1024) "logical:offset:length" words of three numbers below 2**44.
COPY_EXTENDED_HEADER_MAX_BYTES = 64 << 10


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses an extended header over `max_header_bytes` (pass it as
    `tarinfo=` to every tarfile.open that reads a capture's archives)."""

    max_header_bytes = TAR_EXTENDED_HEADER_MAX_BYTES

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        if self.type in _EXTENDED_TYPES and self.size > self.max_header_bytes:
            raise MbrescueError(
                f"a tar extended header of {self.size} bytes (at most "
                f"{self.max_header_bytes} are read): not a capture's archive")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


class CopyTarInfo(BoundedTarInfo):
    """The same bound for a file-level copy (`files-pN.tar.gz`), whose references' extent
    lists are longer than anything in the capture's own tar."""

    max_header_bytes = COPY_EXTENDED_HEADER_MAX_BYTES
