"""/dev/kvm: the system-wide KVM handle that creates VMs and reports what
this host's KVM can do."""

from __future__ import annotations

import errno
import os

from . import uapi
from ..core.kept import KEPT
from .cpuid import CpuidEntry
from .ioctl import KvmError, KvmUnavailable, ioctl
from .uapi import ffi
from .vcpu import read_cpuid2
from .vm import Vm

DEFAULT_DEVICE = "/dev/kvm"


class Kvm:
    def __init__(self, path: str = DEFAULT_DEVICE):
        self.path = path
        self.fd = _open_device(path)
        try:
            try:
                version = ioctl(self.fd, uapi.KVM_GET_API_VERSION)
            except KvmError as error:
                raise KvmUnavailable(error.errno, None, f"{path} is not a KVM device") from None
            if version != uapi.KVM_API_VERSION:
                raise KvmUnavailable(
                    errno.EPROTO, None,
                    f"{path} speaks KVM API {version}, pyvmm needs {uapi.KVM_API_VERSION}",
                )
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when absent, else a capability-specific value."""
        return ioctl(self.fd, uapi.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, uapi.KVM_GET_VCPU_MMAP_SIZE)

    def xen_capabilities(self) -> int:
        """KVM_XEN_HVM_CONFIG_* bits this KVM supports; 0 without Xen support."""
        return self.check_extension(uapi.KVM_CAP_XEN_HVM)

    def supported_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID: what KVM can offer a guest."""
        return read_cpuid2(self.fd, uapi.KVM_GET_SUPPORTED_CPUID)

    def msr_index_list(self) -> list[int]:
        """MSRs KVM saves and restores (KVM_GET_MSR_INDEX_LIST)."""
        probe = ffi.new("struct kvm_msr_list *", {"nmsrs": 0, "indices": 0})
        try:
            ioctl(self.fd, uapi.KVM_GET_MSR_INDEX_LIST, probe)
        except KvmError as error:  # E2BIG, with nmsrs set to the count needed
            if error.errno != errno.E2BIG:
                raise
        count = probe.nmsrs
        msr_list = ffi.new("struct kvm_msr_list *", {"nmsrs": count, "indices": count})
        ioctl(self.fd, uapi.KVM_GET_MSR_INDEX_LIST, msr_list)
        return list(msr_list.indices[0 : msr_list.nmsrs])

    def create_vm(self, machine_type: int = 0) -> Vm:
        return Vm(self.fd, self.vcpu_mmap_size(), machine_type)


def _open_device(path: str) -> int:
    try:
        return KEPT.open(path, os.O_RDWR | os.O_CLOEXEC)  # kept across reboots under the sandbox
    except FileNotFoundError:
        raise KvmUnavailable(errno.ENOENT, None, f"{path} does not exist: no KVM on this host") from None
    except PermissionError as error:
        raise KvmUnavailable(
            error.errno, None, f"no permission to open {path}: join its group (usually 'kvm')"
        ) from None
    except OSError as error:
        raise KvmUnavailable(error.errno, None, f"cannot open {path}") from None
