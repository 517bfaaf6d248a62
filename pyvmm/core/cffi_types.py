"""cffi declarations parsed once per change, not at every start of pyvmm.

cffi parses C declarations with pycparser, in Python: for pyvmm's KVM and
Xen structs that is a large part of `pyvmm run`'s start-up on a slow CPU
(about half a second inside scripts/testbed). cffi's out-of-line ABI mode
can write the parsed types out as a small Python module; `declared_ffi`
keeps such a module next to the package's bytecode (`__pycache__`, named
after a hash of the declarations, so an edit makes a new one) and loads it
instead of parsing. Where that directory cannot be written, it parses.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from pathlib import Path


def declared_ffi(owner_file: str, name: str, declarations: str):
    """An FFI with `declarations` declared: loaded from the cache beside
    `owner_file` (a module's __file__) when present, else parsed (and cached)."""
    digest = hashlib.sha256(declarations.encode()).hexdigest()[:16]
    cached = Path(owner_file).parent / "__pycache__" / f"{name}_cffi_{digest}.py"
    try:
        source = cached.read_text()
    except OSError:
        return _parse_and_cache(name, declarations, cached)
    namespace: dict = {}
    exec(compile(source, str(cached), "exec"), namespace)
    return namespace["ffi"]


def _parse_and_cache(name: str, declarations: str, cached: Path):
    import cffi  # its parser (pycparser) is imported only now

    builder = cffi.FFI()
    builder.cdef(declarations)
    builder.set_source(f"_{name}_cffi", None)
    try:
        cached.parent.mkdir(exist_ok=True)
        partial = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        with contextlib.redirect_stdout(io.StringIO()):  # cffi announces "generating ..."
            builder.emit_python_code(str(partial))
        os.replace(partial, cached)
    except OSError:
        pass  # a read-only installation: parse at every start
    ffi = cffi.FFI()
    ffi.cdef(declarations)
    return ffi
