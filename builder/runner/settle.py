"""Are the disk controllers still finding disks? What the runner's disk wait watches.

Linux shows no "scan finished" flag for a storage controller, and the rescue system has no
udev to settle. Two signs stand in, as `udevadm settle` would read them: the kernel's uevent
sequence number (/sys/kernel/uevent_seqnum) stops moving once no device is being added, and
each kind of controller shows in sysfs while it is still busy — a driver module still in its
init function, an NVMe controller not yet live, a SCSI disk without its block device yet, a
SAS phy with a link up but no device attached behind its host (a SAS HBA's port discovery).
"""

from __future__ import annotations

import os

SYS = "/sys"
# How long the uevent counter must stand still, with no controller busy, before the wait
# may end with no disk that can take the region: a USB disk plugged in a little late (a
# person reaching for it) is still found.
QUIET_S = 10.0
SAS_LINK_DOWN = ("unknown", "phy disabled", "phy reset problem")


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def uevent_seqnum(sys_root: str = SYS) -> int:
    """The kernel's count of device events so far (0 when unreadable)."""
    text = _read(os.path.join(sys_root, "kernel", "uevent_seqnum"))
    return int(text) if text.isdigit() else 0


def _host_driver(sys_root: str, host: str) -> str:
    name = _read(os.path.join(sys_root, "class", "scsi_host", host, "proc_name"))
    return f"{host} ({name})" if name else host


def still_scanning(sys_root: str = SYS) -> list[str]:
    """What is still finding disks, one phrase each ("host2 (mptsas): a SAS link is up on
    phy-2:0, no disk attached yet"); [] when every controller looks done."""
    busy = []
    for module in _listdir(os.path.join(sys_root, "module")):
        if _read(os.path.join(sys_root, "module", module, "initstate")) == "coming":
            busy.append(f"module {module}: still loading")
    for controller in _listdir(os.path.join(sys_root, "class", "nvme")):
        state = _read(os.path.join(sys_root, "class", "nvme", controller, "state"))
        if state and state not in ("live", "dead", "deleting", "deleting (no IO)"):
            busy.append(f"{controller} (nvme): controller {state}")
    for address in _listdir(os.path.join(sys_root, "class", "scsi_device")):
        device = os.path.join(sys_root, "class", "scsi_device", address, "device")
        # Type 0 is a disk: sd attaches it asynchronously, its block device comes last.
        if _read(os.path.join(device, "type")) == "0" and not _listdir(os.path.join(device, "block")):
            host = "host" + address.split(":")[0]
            busy.append(f"{_host_driver(sys_root, host)}: disk {address} being attached")
    attached_hosts = set()
    for kind in ("sas_end_device", "sas_expander"):
        for name in _listdir(os.path.join(sys_root, "class", kind)):
            # end_device-H:P, expander-H:N: the SCSI host number first.
            attached_hosts.add(name.split("-", 1)[-1].split(":")[0])
    for phy in _listdir(os.path.join(sys_root, "class", "sas_phy")):
        host_number = phy.removeprefix("phy-").split(":")[0]
        rate = _read(os.path.join(sys_root, "class", "sas_phy", phy, "negotiated_linkrate"))
        if rate and rate.lower() not in SAS_LINK_DOWN and host_number not in attached_hosts:
            busy.append(f"{_host_driver(sys_root, 'host' + host_number)}: a SAS link is up "
                        f"on {phy}, no disk attached yet")
    return busy
