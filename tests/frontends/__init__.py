"""The fake frontends the unit tests, fuzz targets and host benchmarks drive
pyvmm's backends with: each does what a Linux guest driver does to the shared
pages, rings, grants and xenstore keys, without a VM.

    common    guest RAM with its grant table, shared rings, byte rings, test data
    blkfront  xen-blkfront at ring level, against a BlockBackend
    netfront  xen-netfront's rings and buffers, against a NetBackend and a TAP stand-in
    xenbus    a guest domain and blkfront's xenbus handshake with the vbd
    console   hvc_xen's half of the PV console page
    xenstore  Linux's xenbus client: over the ring page, or as wire messages
    evtchn    the guest's side of 2-level event channels (shared_info, vcpu_info)

tests/conftest.py (and the scripts that use them) put tests/ on sys.path, so
they are imported as `from frontends.blkfront import Blkfront`.
"""
