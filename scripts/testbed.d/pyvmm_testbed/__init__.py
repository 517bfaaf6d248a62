"""The testbed: runs a command inside an L1 Linux whose KVM supports Xen guests.

Kept free of imports: the L1 agent imports this package with a bare interpreter.
"""
