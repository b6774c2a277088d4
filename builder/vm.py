"""QEMU virtual machines for boot tests, fixture installs and `verify --boot`.

QEMU runs under TCG (KVM is unusable on the project's machines), with the
first serial port on QEMU's stdin/stdout: a reader thread collects everything
the guest prints (also into a log file), `expect` waits for a pattern with an
explicit timeout, `send` types into the serial console.

With `VmConfig(qmp=True)` QEMU also listens on a QMP socket: `registers()` reads the
first CPU's state (what `verify --boot` samples to see a started kernel without any
console) and `screendump()` keeps the VGA screen as a PNG (what a person at the console
saw; QEMU writes PPM, converted here with zlib + struct).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from . import log
from .errors import MbrescueError
from .run import base_env, find_tool

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# Secure Boot enforced: the SMM build of OVMF and variables with Microsoft's keys enrolled.
OVMF_CODE_SECBOOT = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
OVMF_VARS_MS = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")


@dataclass
class Disk:
    path: Path
    # virtio | ide | usb | cdrom | usb-cdrom | nvme, or a disk behind a controller of its
    # own: ahci (SATA, ide-hd), megasas (megasas-gen2, MegaRAID SAS), mptsas (mptsas1068,
    # LSI SAS), virtio-scsi (virtio-scsi-pci); the last three with a scsi-hd on bus ID.0.
    interface: str = "virtio"
    readonly: bool = False
    serial: str | None = None
    logical_block_bytes: int | None = None
    fmt: str = "raw"
    # Firmware boot order position. OVMF connects only the devices QEMU lists in its boot
    # order once there is one, so a disk GRUB must see under UEFI needs an index too.
    bootindex: int | None = None
    # The SAS address behind mptsas (QEMU reports scsi-hd's `wwn` as it). A real SAS disk
    # always has one; Linux's mptsas attaches no disk whose address is 0, QEMU's default,
    # so mptsas disks get SAS_WWN_BASE + their index unless this says otherwise.
    wwn: int | None = None


# What scsi-hd's `-device` takes for each controller kind, after `-device CONTROLLER,id=ID`.
CONTROLLERS = {"megasas": "megasas-gen2", "mptsas": "mptsas1068",
               "virtio-scsi": "virtio-scsi-pci"}
SAS_WWN_BASE = 0x5000C50000000000


@dataclass
class VmConfig:
    firmware: str = "bios"  # bios (SeaBIOS, -machine pc) | uefi (OVMF, -machine q35)
    memory_mib: int = 512
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    disks: list[Disk] = field(default_factory=list)
    shares: list[tuple[Path, str]] = field(default_factory=list)  # (host dir, 9p mount tag)
    boot_order: str | None = None  # e.g. "d" for CD first (BIOS)
    extra: list[str] = field(default_factory=list)
    # Which serial port (0 = COM1/ttyS0) is the one read and typed into; ports before it
    # are present but connected to nothing (a server whose serial-over-LAN is ttyS1).
    serial_port: int = 0
    qmp: bool = False  # a QMP socket for registers() and screendump()
    secure_boot: bool = False  # uefi only: OVMF with Secure Boot enforced (Microsoft keys)
    # uefi only: this variable store file, used in place and kept (two boots of one machine
    # share its NVRAM); default: a fresh copy of OVMF's, thrown away with the VM.
    vars_file: Path | None = None


class VmTimeout(MbrescueError):
    pass


class Vm:
    """A running QEMU; use as a context manager so it is always killed."""

    def __init__(self, config: VmConfig, log_path: Path | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.output = ""
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp = Path(tempfile.mkdtemp(prefix="mbrescue-vm-"))
        self._pos = 0
        self.started = 0.0
        self._qmp_sock: socket.socket | None = None
        self._reader_thread: threading.Thread | None = None
        self._qmp_file: BinaryIO | None = None

    def argv(self) -> list[str]:
        c = self.config
        argv = [
            find_tool("qemu-system-x86_64"),
            "-accel",
            "tcg",
            "-m",
            str(c.memory_mib),
            "-display",
            "none",
            *["-serial", "null"] * c.serial_port,
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-no-reboot",
            "-device",
            "virtio-rng-pci",
        ]
        if c.firmware == "uefi":
            vars_copy = c.vars_file or self._tmp / "OVMF_VARS.fd"
            if c.vars_file is None:
                shutil.copyfile(OVMF_VARS_MS if c.secure_boot else OVMF_VARS, vars_copy)
            code = OVMF_CODE_SECBOOT if c.secure_boot else OVMF_CODE
            argv += [
                "-machine",
                "q35,smm=on" if c.secure_boot else "q35",
                "-drive",
                f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                "-drive",
                f"if=pflash,format=raw,unit=1,file={vars_copy}",
            ]
            if c.secure_boot:
                # Only SMM code may then write the variable store: the guest cannot turn
                # Secure Boot off behind the firmware's back.
                argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
        else:
            argv += ["-machine", "pc"]
        if c.kernel:
            argv += ["-kernel", os.fspath(c.kernel)]
        if c.initrd:
            argv += ["-initrd", os.fspath(c.initrd)]
        if c.append:
            argv += ["-append", c.append]
        usb = False
        for index, disk in enumerate(c.disks):
            drive_id = f"disk{index}"
            opts = f"file={os.fspath(disk.path)},format={disk.fmt},if=none,id={drive_id}"
            if disk.readonly:
                opts += ",readonly=on"
            if disk.interface in ("cdrom", "usb-cdrom"):
                opts += ",media=cdrom"
            argv += ["-drive", opts]
            blk = ""
            if disk.logical_block_bytes:
                blk = f",logical_block_size={disk.logical_block_bytes},physical_block_size={disk.logical_block_bytes}"
            serial = f",serial={disk.serial}" if disk.serial else ""
            if disk.bootindex is not None and disk.interface in (
                "virtio", "ide", "nvme", "ahci", *CONTROLLERS
            ):
                serial += f",bootindex={disk.bootindex}"
            if disk.interface == "virtio":
                argv += ["-device", f"virtio-blk-pci,drive={drive_id}{serial}{blk}"]
            elif disk.interface == "ide":
                argv += ["-device", f"ide-hd,drive={drive_id}{serial}{blk}"]
            elif disk.interface == "cdrom":
                argv += ["-device", f"ide-cd,drive={drive_id},bootindex={index}"]
            elif disk.interface in ("usb", "usb-cdrom"):
                if not usb:
                    argv += ["-device", "qemu-xhci,id=xhci"]
                    usb = True
                # With -kernel, QEMU's own boot ROM holds bootindex 0.
                boot = disk.bootindex if disk.bootindex is not None else index
                boot_opt = "" if c.kernel and disk.bootindex is None else f",bootindex={boot}"
                argv += [
                    "-device",
                    f"usb-storage,bus=xhci.0,drive={drive_id}{boot_opt}{serial}",
                ]
            elif disk.interface == "ahci":
                argv += ["-device", f"ahci,id=hba{index}",
                         "-device", f"ide-hd,drive={drive_id},bus=hba{index}.0{serial}{blk}"]
            elif disk.interface in CONTROLLERS:
                if disk.interface == "mptsas":
                    serial += f",wwn={disk.wwn or SAS_WWN_BASE + index + 1:#x}"
                argv += ["-device", f"{CONTROLLERS[disk.interface]},id=hba{index}",
                         "-device", f"scsi-hd,drive={drive_id},bus=hba{index}.0{serial}{blk}"]
            elif disk.interface == "nvme":
                nvme_boot = f",bootindex={disk.bootindex}" if disk.bootindex is not None else ""
                argv += ["-device",
                         f"nvme,drive={drive_id},serial={disk.serial or drive_id}{nvme_boot}{blk}"]
            else:
                raise ValueError(disk.interface)
        for host_dir, tag in c.shares:
            argv += [
                "-virtfs",
                f"local,path={os.fspath(host_dir)},mount_tag={tag},security_model=none,id={tag}",
            ]
        if c.boot_order:
            argv += ["-boot", f"order={c.boot_order}"]
        if c.qmp:
            argv += ["-qmp", f"unix:{self._tmp / 'qmp.sock'},server=on,wait=off"]
        return argv + c.extra

    def __enter__(self) -> Vm:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    def start(self) -> None:
        argv = self.argv()
        log.debug(" ".join(argv))
        self.started = time.monotonic()
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=base_env(),
        )
        self._reader_thread = threading.Thread(target=self._reader, daemon=True)
        self._reader_thread.start()

    def _reader(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        sink = open(self.log_path, "ab") if self.log_path else None
        try:
            while True:
                chunk = os.read(self._proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                if sink:
                    sink.write(chunk)
                    sink.flush()
                with self._cond:
                    self.output += chunk.decode(errors="replace")
                    self._cond.notify_all()
        finally:
            if sink:
                sink.close()
            with self._cond:
                self._cond.notify_all()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait for pattern in output printed since the last match; return the match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = regex.search(self.output, self._pos)
                if found:
                    self._pos = found.end()
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = self.output[-1500:]
                    raise VmTimeout(
                        f"no {pattern!r} on the serial console after {timeout:.0f} s; last output:\n{tail}"
                    )
                if (
                    self._proc is not None
                    and self._proc.poll() is not None
                    and not self._alive_output()
                ):
                    tail = self.output[-1500:]
                    raise VmTimeout(
                        f"QEMU exited ({self._proc.returncode}) before {pattern!r}; last output:\n{tail}"
                    )
                self._cond.wait(min(left, 1.0))

    def _alive_output(self) -> bool:
        return False

    def send(self, text: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(text.encode())
        self._proc.stdin.flush()

    def wait_exit(self, timeout: float) -> int:
        assert self._proc is not None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise VmTimeout(f"QEMU still running after {timeout:.0f} s") from exc

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def drain(self, timeout: float = 5.0) -> None:
        """After QEMU ended: wait until everything it printed has been read."""
        if self._reader_thread is not None:
            self._reader_thread.join(timeout)

    def search(self, pattern: str) -> re.Match[str] | None:
        """The first match in everything printed so far (does not move expect's position)."""
        with self._cond:
            return re.search(pattern, self.output)

    # --- QMP -------------------------------------------------------------------------------

    def qmp(self, command: str, arguments: dict | None = None, timeout: float = 10.0) -> object:
        """Run one QMP command; its `return` value. Needs VmConfig(qmp=True)."""
        if not self.config.qmp:
            raise MbrescueError("this VM was started without a QMP socket")
        if self._qmp_file is None:
            self._qmp_file = self._qmp_connect(timeout)
            self._qmp_call("qmp_capabilities", None)
        return self._qmp_call(command, arguments)

    def _qmp_connect(self, timeout: float) -> BinaryIO:
        path = self._tmp / "qmp.sock"
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(os.fspath(path))
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline or not self.running():
                    raise MbrescueError(f"cannot reach QEMU's QMP socket: {exc}") from exc
                time.sleep(0.1)
                continue
            sock.settimeout(timeout)
            self._qmp_sock = sock
            reader = sock.makefile("rb")
            json.loads(reader.readline())  # the greeting
            return reader

    def _qmp_call(self, command: str, arguments: dict | None) -> object:
        assert self._qmp_file is not None and self._qmp_sock is not None
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            self._qmp_sock.sendall(json.dumps(request).encode() + b"\n")
            while True:
                line = self._qmp_file.readline()
                if not line:
                    raise MbrescueError(f"QEMU closed its QMP socket during {command}")
                reply = json.loads(line)
                if "event" in reply:  # asynchronous events come between replies
                    continue
                if "error" in reply:
                    raise MbrescueError(f"QMP {command}: {reply['error'].get('desc', reply)}")
                return reply.get("return")
        except (OSError, ValueError) as exc:
            raise MbrescueError(f"QMP {command} failed: {exc}") from exc

    def registers(self) -> str:
        """The monitor's `info registers` text for the first CPU."""
        text = self.qmp("human-monitor-command", {"command-line": "info registers"})
        return text if isinstance(text, str) else ""

    def screendump(self, png: Path) -> Path:
        """Save the VGA screen as a PNG; return its path."""
        ppm = self._tmp / "screen.ppm"
        self.qmp("screendump", {"filename": os.fspath(ppm)})
        png.write_bytes(ppm_to_png(ppm.read_bytes()))
        ppm.unlink()
        return png

    def kill(self) -> None:
        if self._qmp_sock is not None:
            self._qmp_sock.close()
            self._qmp_sock = None
            self._qmp_file = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        shutil.rmtree(self._tmp, ignore_errors=True)


def ppm_to_png(ppm: bytes) -> bytes:
    """A binary (P6, 8-bit) PPM as an RGB PNG, written with zlib and struct only."""
    # One whitespace byte ends the header: the pixels may start with bytes that look like it.
    header_match = re.match(rb"P6\s+(\d+)\s+(\d+)\s+255\s", ppm)
    if header_match is None:
        raise MbrescueError("the screen dump is not an 8-bit binary PPM")
    width, height = int(header_match.group(1)), int(header_match.group(2))
    pixels = ppm[header_match.end() :]
    row_bytes = width * 3
    if len(pixels) < row_bytes * height:
        raise MbrescueError("the screen dump is shorter than its size says")
    # Each PNG row starts with its filter type (0: none).
    raw = b"".join(b"\0" + pixels[row * row_bytes : (row + 1) * row_bytes] for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
