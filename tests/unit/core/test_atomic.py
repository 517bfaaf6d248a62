import ctypes
import mmap
import threading

from pyvmm.core import atomic


def page():
    m = mmap.mmap(-1, 4096)
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


def test_fetch_ops_return_old_values():
    m, base = page()
    assert atomic.fetch_or(base, 8, 0b101) == 0
    assert atomic.fetch_and(base, 8, 0b100) == 0b101
    assert int.from_bytes(m[:8], "little") == 0b100
    assert atomic.exchange(base + 8, 2, 0xBEEF) == 0
    assert m[8:10] == b"\xef\xbe"


def test_compare_exchange():
    m, base = page()
    m[16:20] = (7).to_bytes(4, "little")
    assert atomic.compare_exchange(base + 16, 4, 6, 9) == (False, 7)
    assert atomic.compare_exchange(base + 16, 4, 7, 9) == (True, 7)
    assert int.from_bytes(m[16:20], "little") == 9


def test_bit_helpers_use_little_endian_bitmap_numbering():
    m, base = page()
    assert atomic.test_and_set_bit(base, 67) is False
    assert atomic.test_and_set_bit(base, 67) is True
    assert int.from_bytes(m[:16], "little") == 1 << 67
    assert atomic.test_and_clear_bit(base, 67) is True
    assert int.from_bytes(m[:16], "little") == 0


def test_concurrent_bit_setting_loses_nothing():
    m, base = page()

    def setter(first):
        for bit in range(first, 512, 4):
            atomic.test_and_set_bit(base, bit)

    threads = [threading.Thread(target=setter, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert int.from_bytes(m[:64], "little") == (1 << 512) - 1
