"""The AML encoder, byte for byte against the ACPI specification's grammar."""

import shutil
import subprocess

import pytest

from pyvmm.boot import aml
from pyvmm.boot.acpi import table


@pytest.mark.parametrize(
    "payload, encoded",
    [
        (0, b"\x01"),
        (62, b"\x3f"),  # largest one-byte form: 63 including itself
        (63, b"\x41\x04"),  # 65 = 0x41: two bytes, low nibble 1, next byte 4
        (4093, b"\x4f\xff"),
        (4094, b"\x81\x00\x01"),  # 4097 = 0x1001 needs three bytes
        ((1 << 20) - 4, b"\x8f\xff\xff"),  # 0xFFFFF: the largest three-byte form
        ((1 << 20) - 3, b"\xc1\x00\x00\x01"),  # 0x100001 needs four
    ],
)
def test_pkg_length(payload, encoded):
    assert aml.pkg_length(payload) == encoded


def test_pkg_length_limit():
    with pytest.raises(ValueError):
        aml.pkg_length(1 << 28)


@pytest.mark.parametrize(
    "value, encoded",
    [
        (0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0xFF, b"\x0a\xff"),
        (0x100, b"\x0b\x00\x01"), (0x10000, b"\x0c\x00\x00\x01\x00"),
        (1 << 32, b"\x0e" + (1 << 32).to_bytes(8, "little")),
    ],
)
def test_integer(value, encoded):
    assert aml.integer(value) == encoded


def test_integer_range():
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError):
            aml.integer(bad)


def test_name_strings():
    assert aml.name_string("_S5") == b"_S5_"
    assert aml.name_string("\\_S5") == b"\\_S5_"
    assert aml.name_string("\\_SB.PCI0") == b"\\\x2e_SB_PCI0"
    assert aml.name_string("\\_SB.PCI0.ISA") == b"\\\x2f\x03_SB_PCI0ISA_"
    assert aml.name_string("^FOO") == b"^FOO_"
    for bad in ("pci0", "TOOLONG", "1ABC", "A-B"):
        with pytest.raises(ValueError):
            aml.name_string(bad)


def test_strings_eisa_id_and_name():
    assert aml.string("ab") == b"\x0dab\x00"
    assert aml.eisa_id("PNP0A03") == b"\x0c\x41\xd0\x0a\x03"
    assert aml.eisa_id("PNP0501") == b"\x0c\x41\xd0\x05\x01"
    assert aml.name("_UID", 0) == b"\x08_UID\x00"
    with pytest.raises(ValueError):
        aml.eisa_id("pnp0a03")


def test_package_scope_device_method_buffer():
    assert aml.package(5, 5, 0, 0) == b"\x12\x08\x04\x0a\x05\x0a\x05\x00\x00"
    assert aml.scope("\\_SB") == b"\x10\x06\\_SB_"
    assert aml.device("PCI0") == b"\x5b\x82\x05PCI0"
    assert aml.method("_STA", aml.return_(0x0F)) == b"\x14\x09_STA\x00\xa4\x0a\x0f"
    assert aml.method("_X", args=2, serialized=True)[6] == 0x0A
    assert aml.buffer(b"\x79\x00") == b"\x11\x05\x0a\x02\x79\x00"
    with pytest.raises(ValueError):
        aml.package(*range(256))


def test_resource_descriptors():
    assert aml.io(0xCF8, 0xCF8, 1, 8) == b"\x47\x01\xf8\x0c\xf8\x0c\x01\x08"
    assert aml.irq(4) == b"\x22\x10\x00"
    bus = aml.word_bus_number(0, 0xFF)
    assert bus[:3] == b"\x88\x0d\x00" and len(bus) == 16 and bus[3] == 2 and bus[-2:] == b"\x00\x01"
    mem = aml.dword_memory(0xC0000000, 0xFEBFFFFF)
    assert mem[:3] == b"\x87\x17\x00" and len(mem) == 26 and mem[-4:] == (0x3EC00000).to_bytes(4, "little")
    irq = aml.extended_interrupt(5, 9)
    assert irq == b"\x89\x0a\x00\x01\x02" + (5).to_bytes(4, "little") + (9).to_bytes(4, "little")
    assert aml.extended_interrupt(3, level=False, active_low=True, shared=True)[3] == 0x0F
    assert aml.end_tag() == b"\x79\x00"


needs_iasl = pytest.mark.skipif(
    shutil.which("iasl") is None,
    reason="iasl not installed (apt-get install acpica-tools)",
)


def disassemble(tmp_path, blob: bytes, name: str = "table") -> str:
    path = tmp_path / f"{name}.dat"
    path.write_bytes(blob)
    result = subprocess.run(["iasl", "-d", str(path)], capture_output=True, text=True, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Error" not in output and "Warning" not in output, output
    return (tmp_path / f"{name}.dsl").read_text()


@needs_iasl
def test_iasl_decodes_every_construct(tmp_path):
    # Enough names to need a three-byte PkgLength on the device.
    names = [aml.name(f"N{i:03X}", f"value {i}") for i in range(600)]
    body = aml.scope(
        "\\_SB",
        aml.device(
            "DEV0",
            aml.name("_HID", aml.eisa_id("PNP0501")),
            aml.name("_CRS", aml.resource_template(
                aml.io(0x3F8, 0x3F8, 1, 8), aml.irq(4), aml.extended_interrupt(20),
                aml.word_io(0x1000, 0x1FFF), aml.dword_memory(0xE0000000, 0xE0FFFFFF),
            )),
            aml.method("_STA", aml.return_(0x0F)),
            aml.name("PKG", aml.package(1, 0x1234, 0x12345678, 1 << 40, "s")),
            *names,
        ),
    )
    assert len(body) > 1 << 12
    dsl = disassemble(tmp_path, table(b"SSDT", 2, body))
    for expected in ("Device (DEV0)", 'EisaId ("PNP0501")', "IRQNoFlags ()", "Interrupt (",
                     "WordIO (", "DWordMemory (", "Method (_STA, 0, NotSerialized)",
                     "0x0000010000000000", 'Name (N257, "value 599")'):
        assert expected in dsl, expected
