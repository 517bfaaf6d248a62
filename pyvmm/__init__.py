"""pyvmm: a userspace virtual machine monitor that runs Xen HVM guests on KVM."""

__version__ = "0.1.0"
