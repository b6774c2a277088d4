"""QEMU virtual machines for boot tests, fixture installs and `verify --boot`.

QEMU runs under TCG (KVM is unusable on the project's machines), with the
first serial port on QEMU's stdin/stdout: a reader thread collects everything
the guest prints (also into a log file), `expect` waits for a pattern with an
explicit timeout, `send` types into the serial console.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from . import log
from .errors import MbrescueError
from .run import base_env, find_tool

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


@dataclass
class Disk:
    path: Path
    interface: str = "virtio"  # virtio | ide | ahci | usb | cdrom | usb-cdrom | nvme
    readonly: bool = False
    serial: str | None = None
    logical_block_bytes: int | None = None
    fmt: str = "raw"
    # Firmware boot order position. OVMF connects only the devices QEMU lists in its boot
    # order once there is one, so a disk GRUB must see under UEFI needs an index too.
    bootindex: int | None = None


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
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-no-reboot",
            "-device",
            "virtio-rng-pci",
        ]
        if c.firmware == "uefi":
            vars_copy = self._tmp / "OVMF_VARS.fd"
            shutil.copyfile(OVMF_VARS, vars_copy)
            argv += [
                "-machine",
                "q35",
                "-drive",
                f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                "-drive",
                f"if=pflash,format=raw,unit=1,file={vars_copy}",
            ]
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
            if disk.bootindex is not None and disk.interface in ("virtio", "ide", "nvme"):
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
                argv += [
                    "-device",
                    f"usb-storage,bus=xhci.0,drive={drive_id},bootindex={index}{serial}",
                ]
            elif disk.interface == "nvme":
                argv += ["-device", f"nvme,drive={drive_id},serial={disk.serial or drive_id}{blk}"]
            else:
                raise ValueError(disk.interface)
        for host_dir, tag in c.shares:
            argv += [
                "-virtfs",
                f"local,path={os.fspath(host_dir)},mount_tag={tag},security_model=none,id={tag}",
            ]
        if c.boot_order:
            argv += ["-boot", f"order={c.boot_order}"]
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
        threading.Thread(target=self._reader, daemon=True).start()

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

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        shutil.rmtree(self._tmp, ignore_errors=True)
