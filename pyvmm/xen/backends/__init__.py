"""The PV backends, one folder per device kind: blk (vbd), net (vif), console.

Each folder declares its kind in `kind.py` (pyvmm/xen/backend/kind.py says
what a kind holds); this is the one list of them. A new backend is a new
folder and one more entry here."""

from pyvmm.xen.backend.kind import register

from .blk.kind import BLK
from .console.kind import CONSOLE
from .net.kind import NET

KINDS = register(BLK, NET, CONSOLE)
