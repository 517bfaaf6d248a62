"""pyvmm.core.cffi_types: declarations parsed once, then loaded from the cache."""

from __future__ import annotations

from pyvmm.core.cffi_types import declared_ffi

DECLARATIONS = """
    struct pair { uint32_t low; uint64_t high; };
    union either { uint16_t half; uint8_t bytes[6]; };
"""


def _layout(ffi):
    return (ffi.sizeof("struct pair"), ffi.offsetof("struct pair", "high"), ffi.sizeof("union either"))


def test_first_use_parses_and_caches_then_loads_the_same_layout(tmp_path):
    owner = tmp_path / "module.py"
    parsed = declared_ffi(str(owner), "pair", DECLARATIONS)
    cached = list((tmp_path / "__pycache__").glob("pair_cffi_*.py"))
    assert len(cached) == 1
    loaded = declared_ffi(str(owner), "pair", DECLARATIONS)
    assert type(loaded) is not type(parsed)  # really the out-of-line module, not a parse
    assert _layout(parsed) == _layout(loaded) == (16, 8, 6)
    value = loaded.new("struct pair *", {"low": 1, "high": 2**40})
    assert (value.low, value.high) == (1, 2**40)


def test_changed_declarations_get_their_own_cache_entry(tmp_path):
    owner = str(tmp_path / "module.py")
    declared_ffi(owner, "pair", DECLARATIONS)
    changed = declared_ffi(owner, "pair", DECLARATIONS.replace("uint32_t low", "uint64_t low"))
    assert changed.offsetof("struct pair", "high") == 8 and changed.sizeof("struct pair") == 16
    assert len(list((tmp_path / "__pycache__").glob("pair_cffi_*.py"))) == 2


def test_unwritable_cache_still_parses(tmp_path):
    (tmp_path / "__pycache__").write_text("a file where the cache directory would be")
    ffi = declared_ffi(str(tmp_path / "module.py"), "pair", DECLARATIONS)
    assert _layout(ffi) == (16, 8, 6)
    assert list(tmp_path.iterdir()) == [tmp_path / "__pycache__"]
