"""The hypervisor interface a Xen HVM guest sees: hypercalls, event channels, grant
tables, shared_info and vcpu_info, timers, guest memory access, KVM's Xen support
(kvm_xen) and the xen-platform PCI device."""
