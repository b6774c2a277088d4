#!/bin/sh
# /init of the mbrescue rescue system (busybox sh), rendered by builder/initramfs.py.
# PID 1 must never exit (the kernel would panic): every failure prints its reason
# and ends in a busybox shell, and leaving that shell starts another one.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
export TERM="${TERM:-linux}"

say() {
    echo "mbrescue: $*"
}

# The consoles the kernel has (serial and screen). Lines that matter go to all of
# them, as the runner's own output does; without /proc only /dev/console is known.
consoles() {
    [ -r /proc/consoles ] || return 0
    while read -r name _; do
        [ -c "/dev/$name" ] && echo "$name"
    done < /proc/consoles
}

announce() {
    sent=0
    for name in $(consoles); do
        echo "mbrescue: $*" > "/dev/$name" && sent=1
    done
    [ "$sent" = 1 ] || say "$*"
}

wait_for_enter() {
    names="$(consoles)"
    if [ -z "$names" ]; then
        read -r answer
        return
    fi
    rm -f /run/mbrescue-enter
    for name in $names; do
        (read -r answer < "/dev/$name"; : > /run/mbrescue-enter) &
    done
    while [ ! -e /run/mbrescue-enter ]; do
        usleep 200000
    done
}

rescue_shell() {
    [ -n "$1" ] && announce "error: $1"
    echo "mbrescue: starting a rescue shell (to run the restore again: PYTHONHASHSEED=0 PYTHONPATH=/opt/mbrescue python3 -m mbrescue_runner rescue /mbrescue/capture.mbrescue)"
    while true; do
        # cttyhack gives the shell the console's real tty, so Ctrl-C and job control work.
        setsid cttyhack sh -l
        echo "mbrescue: the shell ended; starting another (reboot: reboot -f)"
        sleep 1
    done
}

mkdir -p /proc /sys /dev /run /tmp
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || rescue_shell "cannot mount /dev"
mkdir -p /dev/pts
mount -t devpts -o nosuid,noexec,gid=5,mode=0620 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
ln -sf /proc/self/fd /dev/fd

shell_requested=0
loglevel_chosen=0
medium_id=""
after_restore=reboot
wait_limit_s=120
for word in $(cat /proc/cmdline); do
    case "$word" in
        quiet|debug|loglevel=*)
            loglevel_chosen=1 ;;
        mbrescue.shell=1|mbrescue.shell=yes|mbrescue.shell=true|mbrescue.shell=on)
            shell_requested=1 ;;
        mbrescue.medium=*)
            medium_id="${word#mbrescue.medium=}" ;;
        # `mbrescue rescue` (through a BMC) asks for this: a powered-off machine is the one
        # sign of "restore complete" that every Redfish service can report.
        mbrescue.after=poweroff)
            after_restore=poweroff ;;
        mbrescue.wait=*)
            value="${word#mbrescue.wait=}"
            case "$value" in
                ''|*[!0-9]*) say "ignoring mbrescue.wait=$value (not a number of seconds)" ;;
                *) wait_limit_s="$value" ;;
            esac ;;
    esac
done

# Disk drivers, dependencies first. A driver for hardware this machine lacks may
# refuse to load (Xen, Hyper-V); that is expected, so only the names are shown, and
# a module whose dependency failed is not tried (it would only fill the console).
loaded=0
failed=" "
load() {
    module="$1"
    path="$2"
    shift 2
    for dependency in "$@"; do
        case "$failed" in
            *" $dependency "*) failed="$failed$module "; return ;;
        esac
    done
    if insmod "/lib/modules/6.1.0-99-amd64/$path" 2>/dev/null; then
        loaded=$((loaded + 1))
    else
        failed="$failed$module "
    fi
}

load virtio_ring kernel/drivers/virtio/virtio_ring.ko
load virtio kernel/drivers/virtio/virtio.ko virtio_ring
load virtio_blk kernel/drivers/block/virtio_blk.ko virtio virtio_ring
load hv_vmbus kernel/drivers/hv/hv_vmbus.ko
load hv_storvsc kernel/drivers/scsi/hv_storvsc.ko hv_vmbus
failed="${failed# }"
say "kernel 6.1.0-99-amd64: $loaded disk drivers loaded${failed:+ (not for this machine: ${failed% })}"

# The firmware's variables, under UEFI: the runner reads BootOrder and Boot#### there and
# adds a boot entry for the restored ESP when the firmware has none (a new mainboard).
# efivarfs is a module in Debian's kernel; without EFI it refuses to load, so only here.
if [ -d /sys/firmware/efi ]; then
    mkdir -p /sys/firmware/efi/efivars
    mount -t efivarfs -o nosuid,nodev,noexec efivarfs /sys/firmware/efi/efivars 2>/dev/null \
        || say "efivarfs could not be mounted: no firmware boot entry can be added"
fi

# Secure Boot as the kernel enforces it: Debian's kernel enters lockdown (integrity) when
# the firmware booted it with Secure Boot on. (The SecureBoot variable itself is read by
# no one here; securityfs says what the kernel enforces.) Lockdown blocks nothing the
# restore needs: signed modules load, block devices and efivarfs stay writable.
mkdir -p /sys/kernel/security
mount -t securityfs -o nosuid,nodev,noexec securityfs /sys/kernel/security 2>/dev/null
case "$(cat /sys/kernel/security/lockdown 2>/dev/null)" in
    *"[integrity]"*|*"[confidentiality]"*)
        announce "UEFI Secure Boot is enforced (kernel lockdown: on)" ;;
    *) if [ -d /sys/firmware/efi ]; then announce "UEFI Secure Boot is off"
       else announce "booted by BIOS (no Secure Boot)"; fi ;;
esac

# Kernel chatter (a USB stick plugged in) would tear the runner's plan and prompt apart
# on the console; errors and warnings still show. An explicit quiet/loglevel= wins.
[ "$loglevel_chosen" = 1 ] || dmesg -n 5

if [ "$shell_requested" = 1 ]; then
    rescue_shell ""
fi

# AHCI, NVMe and USB probe asynchronously: wait until the set of disks has not
# changed for 2 s, at most $wait_limit_s s (mbrescue.wait=N). Slower controllers
# (SAS HBAs, RAID) are the runner's to wait for: while no disk can take the region it waits
# for every controller still scanning, then a little for a disk plugged in late, never past
# the limit, so it is told when the limit ends (seconds since boot, as /proc/uptime).
read -r uptime_s _ < /proc/uptime
export MBRESCUE_WAIT_UNTIL=$(( ${uptime_s%.*} + wait_limit_s ))
list_disks() {
    for entry in /sys/block/*; do
        case "${entry##*/}" in
            loop*|ram*|zram*|dm-*|md*|nbd*) ;;
            *) [ -e "$entry" ] && echo "${entry##*/}" ;;
        esac
    done
}
previous=""
steady_ticks=0
ticks=0
while [ "$ticks" -lt $((wait_limit_s * 4)) ]; do
    current="$(list_disks)"
    if [ "$current" = "$previous" ]; then
        steady_ticks=$((steady_ticks + 1))
        [ "$steady_ticks" -ge 8 ] && break
    else
        steady_ticks=0
    fi
    previous="$current"
    usleep 250000
    ticks=$((ticks + 1))
done
disks="$(list_disks | tr '\n' ' ')"
say "disks: ${disks:-none found}"

# A payload larger than RAM allows, or damaged on the medium, stops the kernel's unpacking
# half-way; the runner would refuse the capture too, but this says why.
unpack_error="$(dmesg | grep -m 1 'Initramfs unpacking failed')"
[ -z "$unpack_error" ] || rescue_shell "the kernel could not unpack the whole rescue system \
(too little RAM for the capture, or a damaged medium): ${unpack_error#*] }"
[ -x /usr/bin/python3.11 ] || rescue_shell "/usr/bin/python3.11 is missing from the rescue system"

# The capture: loaded into memory by GRUB (a network boot, or the ISO's in-memory entry), or
# else read from this medium, found by its id file, with Linux's own drivers (the prompt then
# comes as fast for a 1 GiB capture as for a small one, in little RAM). A USB stick or virtual
# CD may show up late: look until the wait limit.
find_medium() {
    for entry in /sys/block/*; do
        name="${entry##*/}"
        case "$name" in loop*|ram*|zram*|dm-*|md*|nbd*) continue ;; esac
        [ -b "/dev/$name" ] || continue
        mount -t iso9660 -o ro,nodev,nosuid "/dev/$name" /run/mbrescue-medium 2>/dev/null || continue
        if [ -f "/run/mbrescue-medium/mbrescue/id-$medium_id" ] && [ -f /run/mbrescue-medium/mbrescue/payload.img ]; then
            medium_device="/dev/$name"
            return 0
        fi
        umount /run/mbrescue-medium
    done
    return 1
}
if [ -f /mbrescue/capture.mbrescue ]; then
    announce "capture: loaded into memory by the boot loader"
elif [ -z "$medium_id" ]; then
    rescue_shell "no capture in memory and no mbrescue.medium= to find the medium by"
else
    mkdir -p /run/mbrescue-medium
    while ! find_medium; do
        read -r uptime_s _ < /proc/uptime
        if [ "${uptime_s%.*}" -ge "$MBRESCUE_WAIT_UNTIL" ]; then
            rescue_shell "this rescue medium (id $medium_id) is on no disk Linux sees here (no \
driver for its drive?): boot its menu entry 'capture loaded into memory' instead"
        fi
        usleep 250000
    done
    # The runner reads the capture inside the medium's payload cpio in place.
    mkdir -p /mbrescue
    ln -s /run/mbrescue-medium/mbrescue/payload.img /mbrescue/capture.mbrescue
    ln -s /run/mbrescue-medium/mbrescue/options.json /mbrescue/options.json
    announce "capture: read from this medium ($medium_device)"
fi

# A session of its own with the console's real tty as controlling terminal (cttyhack:
# /dev/console itself cannot be one), so Ctrl-C there reaches the runner, not PID 1.
setsid cttyhack env PYTHONHASHSEED=0 PYTHONPATH=/opt/mbrescue python3 -m mbrescue_runner rescue /mbrescue/capture.mbrescue
status=$?
if [ "$status" != 0 ]; then
    rescue_shell "the restore runner ended with exit status $status"
fi

sync
if [ "$after_restore" = poweroff ]; then
    announce "powering off (mbrescue.after=poweroff)"
    poweroff -f
    rescue_shell "power off failed"
fi
if [ -e /run/mbrescue-unattended ]; then
    # Nobody at the keyboard: boot the restored disk. With the medium still inserted, its
    # GRUB finds the host's /boot and boots the local disk by default.
    announce "restore complete without a person: rebooting into the restored disk in 10 s (Enter: now)"
    ( sleep 10; : > /run/mbrescue-enter ) &
fi
announce "press Enter to reboot"
wait_for_enter
reboot -f
rescue_shell "reboot failed"
