"""The ioctl call site, opening /dev/kvm and the parts of Vm that need no KVM."""

import errno
import os

import pytest

from pyvmm.kvm import ioctl as ioctl_module
from pyvmm.kvm import uapi
from pyvmm.kvm.ioctl import KvmError, KvmUnavailable, ioctl
from pyvmm.kvm.system import Kvm
from pyvmm.kvm.vm import (
    IrqchipRoute,
    MsiRoute,
    Vm,
    XenEvtchnRoute,
    _fill_route,
    pc_irqchip_routes,
)
from pyvmm.kvm.uapi import ffi


def test_error_carries_errno_and_ioctl_name():
    with pytest.raises(KvmError) as caught:
        ioctl(-1, uapi.KVM_GET_API_VERSION)
    assert caught.value.errno == errno.EBADF
    assert caught.value.ioctl == "KVM_GET_API_VERSION"
    assert "KVM_GET_API_VERSION" in str(caught.value)
    assert isinstance(caught.value, OSError)


def test_not_a_kvm_fd_gives_enotty():
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with pytest.raises(KvmError) as caught:
            ioctl(fd, uapi.KVM_RUN)
        assert caught.value.errno == errno.ENOTTY
    finally:
        os.close(fd)


class ScriptedLibc:
    """Stands in for libc: returns scripted (result, errno) pairs."""

    def __init__(self, *script):
        self.script = list(script)
        self.calls = []

    def ioctl(self, fd, request, arg):
        self.calls.append((fd, int(request), arg))
        result, err = self.script.pop(0)
        ioctl_module._libc_ffi.errno = err
        return result


def test_eintr_is_retried_by_default(monkeypatch):
    libc = ScriptedLibc((-1, errno.EINTR), (-1, errno.EINTR), (7, 0))
    monkeypatch.setattr(ioctl_module, "_libc", libc)
    assert ioctl(3, uapi.KVM_CHECK_EXTENSION, 10) == 7
    assert len(libc.calls) == 3


def test_eintr_surfaces_when_asked(monkeypatch):
    monkeypatch.setattr(ioctl_module, "_libc", ScriptedLibc((-1, errno.EINTR)))
    with pytest.raises(KvmError) as caught:
        ioctl(3, uapi.KVM_RUN, retry_on_eintr=False)
    assert caught.value.errno == errno.EINTR


def test_large_integer_argument_is_passed_unsigned(monkeypatch):
    libc = ScriptedLibc((0, 0))
    monkeypatch.setattr(ioctl_module, "_libc", libc)
    ioctl(3, uapi.KVM_SET_TSS_ADDR, 0xFFFB_D000)
    assert int(libc.calls[0][2]) == 0xFFFB_D000


def test_missing_device_is_kvm_unavailable(tmp_path):
    with pytest.raises(KvmUnavailable, match="does not exist"):
        Kvm(str(tmp_path / "kvm"))


def test_non_kvm_device_is_kvm_unavailable():
    with pytest.raises(KvmUnavailable, match="not a KVM device"):
        Kvm("/dev/null")


def test_unreadable_device_is_kvm_unavailable(tmp_path, monkeypatch):
    def refuse(path, flags):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(KvmUnavailable, match="permission"):
        Kvm(str(tmp_path / "kvm"))


def test_wrong_api_version_is_kvm_unavailable(monkeypatch):
    monkeypatch.setattr(ioctl_module, "_libc", ScriptedLibc((11, 0)))
    with pytest.raises(KvmUnavailable, match="API 11"):
        Kvm("/dev/null")


# --- GSI routing --------------------------------------------------------------


def test_pc_routes_send_the_pit_to_ioapic_pin_2():
    routes = pc_irqchip_routes()
    ioapic = {r.gsi: r.pin for r in routes if r.irqchip == uapi.KVM_IRQCHIP_IOAPIC}
    assert ioapic[0] == 2
    assert 2 not in ioapic
    assert all(ioapic[g] == g for g in range(3, 24))
    pic = {(r.gsi, r.irqchip, r.pin) for r in routes if r.irqchip != uapi.KVM_IRQCHIP_IOAPIC}
    assert (1, uapi.KVM_IRQCHIP_PIC_MASTER, 1) in pic
    assert (12, uapi.KVM_IRQCHIP_PIC_SLAVE, 4) in pic
    assert not any(gsi == 2 for gsi, _, _ in pic)
    assert len(routes) == 15 + 23


@pytest.mark.parametrize(
    "route,expected_type,words",
    [
        (IrqchipRoute(5, uapi.KVM_IRQCHIP_IOAPIC, 5), uapi.KVM_IRQ_ROUTING_IRQCHIP, (2, 5)),
        (MsiRoute(24, 0x1_FEE0_1000, 0x4031), uapi.KVM_IRQ_ROUTING_MSI, (0xFEE0_1000, 1, 0x4031)),
        (XenEvtchnRoute(25, 3, 1), uapi.KVM_IRQ_ROUTING_XEN_EVTCHN, (3, 1, 0xFFFF_FFFF)),
    ],
)
def test_routes_are_packed_like_the_kernel(route, expected_type, words):
    entry = ffi.new("struct kvm_irq_routing_entry *")
    _fill_route(entry, route)
    raw = bytes(ffi.buffer(entry))
    assert int.from_bytes(raw[0:4], "little") == route.gsi
    assert int.from_bytes(raw[4:8], "little") == expected_type
    union = [int.from_bytes(raw[16 + 4 * i : 20 + 4 * i], "little") for i in range(len(words))]
    assert tuple(union) == words


def test_unknown_route_type_is_refused():
    with pytest.raises(TypeError):
        _fill_route(ffi.new("struct kvm_irq_routing_entry *"), (1, 2, 3))


def test_xen_config_refuses_capability_only_flags():
    vm = object.__new__(Vm)  # the check comes before any ioctl
    with pytest.raises(ValueError, match="capability-only"):
        vm.xen_hvm_config(uapi.KVM_XEN_HVM_CONFIG_HYPERCALL_MSR, 0x4000_0000)
