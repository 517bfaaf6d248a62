"""The host's end of a guest network interface: a Linux TAP device.

`TapDevice.open(name)` attaches to the TAP device `name`, creating it when
it does not exist (a device made here goes away with the VMM; one made
beforehand, e.g. `ip tuntap add dev NAME mode tap`, stays), and brings its
link up through pyroute2. The file descriptor is non-blocking and carries
whole Ethernet frames, each behind a 10-byte virtio_net_hdr
(IFF_VNET_HDR), which is how checksum offload and GSO cross the boundary
without the VMM touching the payload:

    u8  flags        VIRTIO_NET_HDR_F_NEEDS_CSUM: complete the checksum at
                     csum_start + csum_offset; F_DATA_VALID: already checked
    u8  gso_type     NONE, TCPV4, TCPV6 (| ECN)
    u16 hdr_len      length of the headers of a GSO packet
    u16 gso_size     the MSS of a GSO packet
    u16 csum_start
    u16 csum_offset

`set_offload()` (TUNSETOFFLOAD) says what the guest can take: without it
the host's stack gives the device only checksummed, MTU-sized frames.

Creating a device, or attaching to one owned by someone else, needs
CAP_NET_ADMIN: without it TapError says so.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import ctypes
import struct

from ioctl_opt import IOR, IOW

from pyvmm.core.kept import KEPT

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"

TUNSETIFF = IOW(ord("T"), 202, ctypes.c_int)
TUNSETOFFLOAD = IOW(ord("T"), 208, ctypes.c_uint)
TUNGETIFF = IOR(ord("T"), 210, ctypes.c_uint)
TUNSETVNETHDRSZ = IOW(ord("T"), 216, ctypes.c_int)

IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80

VNET_HDR = struct.Struct("<BBHHHH")
VNET_HDR_SIZE = VNET_HDR.size  # 10

_IFREQ = struct.Struct("16sH22x")


class TapError(OSError):
    """A TAP device that cannot be had; str() says what is missing."""


class TapDevice:
    def __init__(self, name: str, fd: int):
        self.name = name
        self.fd = fd
        self.offload = 0

    @classmethod
    def open(cls, name: str, *, link_up: bool = True) -> "TapDevice":
        # Under the sandbox the first boot's descriptor is kept (pyvmm/core/kept.py):
        # a reboot attaches to the same device, already configured and up.
        kept = KEPT.kept_fd(("tap", name))
        if kept is not None:
            tap = cls(name, kept)
            try:
                fcntl.ioctl(kept, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
                tap.set_offload(0)
            except BaseException:
                os.close(kept)
                raise
            return tap
        KEPT.check_unlocked(f"attach to TAP device {name}")
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            raise _explain(error, name, f"cannot open {TUN_DEVICE}") from None
        try:
            request = _IFREQ.pack(name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            try:
                fcntl.ioctl(fd, TUNSETIFF, request)
            except OSError as error:
                raise _explain(error, name, "cannot create or attach to the TAP device") from None
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
            tap = cls(name, fd)
            tap.set_offload(0)
            if link_up:
                set_link_up(name)
            KEPT.keep_fd(("tap", name), fd)
            return tap
        except BaseException:
            os.close(fd)
            raise

    def set_offload(self, flags: int) -> None:
        """TUN_F_* the reader (the guest) can take."""
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        self.offload = flags

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _explain(error: OSError, name: str, what: str) -> TapError:
    if error.errno in (errno.EPERM, errno.EACCES):
        message = (f"{what}: permission denied; creating a TAP device (or using one owned by another user) "
                   "needs root or CAP_NET_ADMIN")
    elif error.errno == errno.ENOENT:
        message = f"{what}: {TUN_DEVICE} is missing (load the tun kernel module: modprobe tun)"
    elif error.errno == errno.EBUSY:
        message = f"{what}: it is in use by another process"
    else:
        message = f"{what}: {error.strerror}"
    return TapError(error.errno, message, name)


def set_link_up(name: str) -> None:
    """`ip link set NAME up`, through netlink (pyroute2)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        indexes = ipr.link_lookup(ifname=name)
        if not indexes:
            raise TapError(errno.ENODEV, "the TAP device vanished", name)
        try:
            ipr.link("set", index=indexes[0], state="up")
        except Exception as error:
            raise TapError(getattr(error, "code", errno.EPERM), f"cannot bring the link up: {error}", name) from None
