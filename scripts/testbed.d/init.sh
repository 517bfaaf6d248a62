#!/bin/busybox sh
# /init of the testbed's L1 Linux (busybox sh, from the initramfs).
#
# Loads the boot modules (KVM with Xen support, 9p, tun/bridge/veth), mounts
# the host's root filesystem read-only over 9p at /host, gives it fresh
# /proc, /sys, /dev and /run, and starts the agent chrooted into it; the
# agent (pyvmm_testbed/agent.py) does the per-run mounts and runs the command.
#
# Kernel command line: pyvmm.python=PATH  the host's Python, to run the agent.
# A line starting with PYVMM-TESTBED-FATAL: on the console tells the host why
# L1 gave up; keep that marker in step with host.py.

/bin/busybox --install -s /bin
export PATH=/bin
export HOME=/
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fatal() {
    echo "PYVMM-TESTBED-FATAL: $*"
    poweroff -f
    # Not reached while ACPI power-off works; otherwise PID 1 exiting panics
    # the kernel, which (panic=-1, QEMU -no-reboot) stops the machine too.
    exit 1
}

python=
for argument in $(cat /proc/cmdline); do
    case "$argument" in
        pyvmm.python=*) python="${argument#pyvmm.python=}" ;;
    esac
done
[ -n "$python" ] || fatal "no pyvmm.python= on the kernel command line"

while read -r module; do
    insmod "/lib/modules/$module.ko" || fatal "cannot load kernel module $module"
done < /etc/testbed-modules
[ -c /dev/kvm ] || fatal "/dev/kvm is missing in L1 after loading kvm_amd (does the CPU model have svm?)"

ifconfig lo 127.0.0.1 up
hostname testbed

# The host's files are read-only and do not change under a run: cache them hard.
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /host \
    || fatal "cannot mount the host's root filesystem over 9p"
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /host/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm
ln -sf /proc/self/fd /host/dev/fd
ln -sf /proc/self/fd/0 /host/dev/stdin
ln -sf /proc/self/fd/1 /host/dev/stdout
ln -sf /proc/self/fd/2 /host/dev/stderr
mount -t tmpfs -o mode=755 tmpfs /host/run \
    || fatal "cannot mount /run: the host has no /run directory"
mkdir -p /host/run/pyvmm-testbed
cp -r /testbed/pyvmm_testbed /host/run/pyvmm-testbed/
cp /bin/busybox /host/run/pyvmm-testbed/busybox

chroot /host "$python" -E -s -S /run/pyvmm-testbed/pyvmm_testbed/agent.py
fatal "the testbed agent ($python) exited with status $?"
