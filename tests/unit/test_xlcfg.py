"""xl.cfg files: the syntax, the keys pyvmm honours, and everything it refuses."""

import logging
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.config import ConfigError
from pyvmm.xen.backends.blk.spec import DiskSpec, parse_disk_spec
from pyvmm.xen.backends.net.spec import NicSpec as VifSpec, parse_mac, parse_vif_spec
from pyvmm.xlcfg import (
    XlConfig,
    XlConfigError,
    format_xl,
    format_xl_value,
    load_xl_config,
    parse_xl,
    xl_config_from_text,
)

MiB = 1 << 20


def load(text: str, tmp_path: Path, name: str = "vm.cfg") -> XlConfig:
    path = tmp_path / name
    path.write_text(text)
    return load_xl_config(path)


def error_of(text: str, filename: str = "vm.cfg") -> XlConfigError:
    with pytest.raises(XlConfigError) as caught:
        xl_config_from_text(text, filename)
    return caught.value


HVM = 'name = "g"\ntype = "hvm"\n'


# ---------------------------------------------------------------- real-world files

DEBIAN_HVM = """\
# =====================================================================
# Debian bookworm HVM guest, made by hand after xlexample.hvm
# =====================================================================
name        = "bookworm"
builder     = 'hvm'            # the old spelling of type = "hvm"

memory      = 1024
maxmem      = 1024
vcpus       = 2

kernel      = "/srv/xen/bookworm/vmlinuz-6.1.0-13-cloud-amd64"
ramdisk     = "/srv/xen/bookworm/initrd.img-6.1.0-13-cloud-amd64"
root        = "/dev/xvda1 ro"
extra       = "console=hvc0 earlyprintk=xen"

# Disks: the old xend syntax and the positional one
disk = [
    'phy:/dev/vg0/bookworm-disk,xvda,w',
    'file:/srv/xen/bookworm/swap.img,xvdb,w',
    '/srv/xen/bookworm/data.img, raw, xvdc, ro',   # trailing comma below is fine
]

vif = [ 'mac=00:16:3E:5a:01:02, bridge=xenbr0, vifname=bookworm0' ]

on_poweroff = "destroy"
on_reboot   = "restart"
on_crash    = "destroy"

serial = "pty"
boot   = "c"
acpi   = 1
apic   = 1
pae    = 1
vnc    = 0
sdl    = 0
xen_platform_pci = 1
"""


def test_debian_hvm(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pyvmm.xlcfg"):
        config = load(DEBIAN_HVM, tmp_path)
    assert config.name == "bookworm"
    assert config.memory_mib == 1024 and config.vcpus == 2
    assert config.kernel == Path("/srv/xen/bookworm/vmlinuz-6.1.0-13-cloud-amd64")
    assert config.ramdisk == Path("/srv/xen/bookworm/initrd.img-6.1.0-13-cloud-amd64")
    assert config.cmdline == "root=/dev/xvda1 ro console=hvc0 earlyprintk=xen"
    assert config.disks == (
        DiskSpec(Path("/dev/vg0/bookworm-disk"), "xvda", False),
        DiskSpec(Path("/srv/xen/bookworm/swap.img"), "xvdb", False),
        DiskSpec(Path("/srv/xen/bookworm/data.img"), "xvdc", True),
    )
    assert config.vifs == (VifSpec("bookworm0", "00:16:3e:5a:01:02"),)
    assert config.serial == "stdio"
    assert len(config.warnings) == 1 and "bridge=xenbr0" in config.warnings[0]
    assert config.warnings[0].startswith(f"{tmp_path / 'vm.cfg'}:23: ")
    assert "ip link set bookworm0 master xenbr0" in caplog.text
    assert config.to_run_options() == {
        "name": "bookworm",
        "xen": True,
        "kernel": Path("/srv/xen/bookworm/vmlinuz-6.1.0-13-cloud-amd64"),
        "initrd": Path("/srv/xen/bookworm/initrd.img-6.1.0-13-cloud-amd64"),
        "cmdline": "root=/dev/xvda1 ro console=hvc0 earlyprintk=xen",
        "memory": 1024 * MiB,
        "vcpus": 2,
        "serial": "stdio",
        "no_reboot": False,
        "disks": config.disks,
        "vifs": config.vifs,
    }


UBUNTU_HVM = """\
name = "jammy"; type = "hvm"
memory = 2048
vcpus = 4
kernel = "/var/lib/xen/images/jammy/vmlinuz"
ramdisk = "/var/lib/xen/images/jammy/initrd.img"
cmdline = "root=/dev/xvda ro console=hvc0 quiet"
root = "/dev/sda1"                    # ignored: cmdline wins, as in xl
disk = ['format=raw, vdev=xvda, access=rw, target=/var/lib/xen/images/jammy/disk.img',
        'vdev=xvdb, access=r, target=/var/lib/xen/images/jammy/seed, with comma.img',
        ]
vif = ['vifname=jammy-net,type=vif', "vifname=jammy-mgmt, model=e1000, mac=aa:00:00:00:00:01"]
on_reboot = "destroy"
serial = [ "file:/var/log/xen/jammy-serial.log" ]
"""


def test_ubuntu_hvm_key_value_disks(tmp_path):
    config = load(UBUNTU_HVM, tmp_path)
    assert config.cmdline == "root=/dev/xvda ro console=hvc0 quiet"
    assert config.disks == (
        DiskSpec(Path("/var/lib/xen/images/jammy/disk.img"), "xvda", False),
        DiskSpec(Path("/var/lib/xen/images/jammy/seed, with comma.img"), "xvdb", True),
    )
    assert config.vifs == (VifSpec("jammy-net"), VifSpec("jammy-mgmt", "aa:00:00:00:00:01"))
    assert [w.split(": ", 1)[0] for w in config.warnings] == [f"{tmp_path / 'vm.cfg'}:6",
                                                              f"{tmp_path / 'vm.cfg'}:11"]
    assert "in favour of cmdline=" in config.warnings[0]
    assert "model=e1000" in config.warnings[1]
    options = config.to_run_options()
    assert options["memory"] == 2048 * MiB and options["vcpus"] == 4
    assert options["no_reboot"] is True
    assert options["serial"] == "file:/var/log/xen/jammy-serial.log"
    assert [vif.option_text() for vif in options["vifs"]] == ["tap=jammy-net", "tap=jammy-mgmt,mac=aa:00:00:00:00:01"]


def test_minimal_file_gives_only_what_it_says(tmp_path):
    config = load(HVM, tmp_path)
    assert config.to_run_options() == {"name": "g", "xen": True, "no_reboot": False}
    assert config.warnings == ()


def test_no_final_newline_and_crlf():
    config = xl_config_from_text('name = "g"\r\ntype = "hvm"\r\nmemory = 0x100')
    assert config.memory_mib == 256


@pytest.mark.parametrize("root,extra,expected", [
    (None, None, None),
    ("/dev/xvda1", None, "root=/dev/xvda1"),
    (None, "console=hvc0", "console=hvc0"),
    ("/dev/xvda1 ro", "quiet", "root=/dev/xvda1 ro quiet"),
])
def test_root_and_extra(root, extra, expected):
    text = HVM + (f'root = "{root}"\n' if root else "") + (f'extra = "{extra}"\n' if extra else "")
    config = xl_config_from_text(text)
    assert config.cmdline == expected
    assert ("cmdline" in config.to_run_options()) == (expected is not None)


def test_cmdline_alone_and_empty():
    assert xl_config_from_text(HVM + 'cmdline = "console=hvc0"').cmdline == "console=hvc0"
    assert xl_config_from_text(HVM + 'cmdline = ""\nextra="x"').cmdline == ""


def test_maxmem_alone_is_the_memory_and_numbers_in_strings():
    config = xl_config_from_text(HVM + 'maxmem = "768"\nvcpus = "2"\nmaxvcpus = 2')
    assert config.memory_mib == 768 and config.vcpus == 2


def test_harmless_keys_with_pyvmm_values():
    text = HVM + "boot = 'dc'\nhap=1\nnx=1\nviridian=0\nhpet=0\nlocaltime=0\nnographic=1\nusb=0\nnestedhvm=0\n" \
                 "vga='none'\nviridian=[]\nacpi=0x1\n"
    assert xl_config_from_text(text).name == "g"


@pytest.mark.parametrize("serial,expected", [
    ('"pty"', "stdio"), ('"stdio"', "stdio"), ('"none"', "none"), ('"null"', "none"), ("[]", "none"),
    ('"file:/tmp/s.log"', "file:/tmp/s.log"), ('["none", "pty"]', "stdio"),
])
def test_serial(serial, expected):
    assert xl_config_from_text(HVM + f"serial = {serial}").serial == expected


def test_empty_device_lists():
    config = xl_config_from_text(HVM + "disk = []\nvif = [\n]\n")
    assert config.disks == () and config.vifs == ()
    assert "disks" not in config.to_run_options()


# ---------------------------------------------------------------- syntax

def test_syntax_basics():
    settings = parse_xl("a = 'x' ; b = \"y\"  # c = 1\n\n;;\nlst = [ 'p',\n  'q', # comment\n\n  'r',\n]\n"
                        "n = 010\nh = 0x1F\nz = 0\n")
    assert {k: s.value for k, s in settings.items()} == {
        "a": "x", "b": "y", "lst": ("p", "q", "r"), "n": 8, "h": 31, "z": 0}
    assert settings["lst"].line == 4 and settings["lst"].item_lines == (4, 5, 7)
    assert settings["n"].line == 9


def test_escapes():
    settings = parse_xl(r"""s = "a\"b\'c\\d\n\t\x41\101\0" ; t = 'it\'s' ; u = "\xc3\xa9" """)
    assert settings["s"].value == "a\"b'c\\d\n\tAA\0"
    assert settings["t"].value == "it's"
    assert settings["u"].value == "é"


def test_later_assignment_wins_and_plus_equals():
    settings = parse_xl("a = 'x'\na = 'y'\nb = 'p'\nb += 'q'\nl = ['1']\nl += ['2', '3']\nm += ['new']\n")
    assert settings["a"].value == "y" and settings["a"].line == 2
    assert settings["b"].value == "pq"
    assert settings["l"].value == ("1", "2", "3") and settings["l"].item_lines == (5, 6, 6)
    assert settings["m"].value == ("new",)


def test_nested_lists_parse_but_are_refused_for_disks():
    assert parse_xl("a = [[1, 'x'], []]")["a"].value == ((1, "x"), ())
    error = error_of(HVM + "disk = [['/x,,xvda']]")
    assert error.line == 3 and "not a list of lists" in str(error)


@pytest.mark.parametrize("text,line,message", [
    ('name = "abc\n', 1, "unterminated string"),
    ("\n\nname = 'abc", 3, "unterminated string"),
    ('a = "x\\', 1, "unterminated string"),
    ('a = "\\q"', 1, "invalid escape \\q"),
    ('a = "\\xZZ"', 1, "\\x in a string"),
    ('a = "\\777"', 1, "larger than a byte"),
    ("memory = 512M", 1, "'512M' is not a number"),
    ("a = 08", 1, "'08' is not a number"),
    ("a = -1", 1, "unexpected character '-'"),
    ("a = 1.5", 1, "'1.5' is not a number"),
    ("a 1", 1, "expected '=' after a"),
    ("= 1", 1, "expected KEY = VALUE"),
    ("'a' = 1", 1, "expected KEY = VALUE, found a string"),
    ("a =\n'x'", 1, "expected a value"),
    ("acpi = True", 1, "write 1 or 0"),
    ("name = guest", 1, "strings need quotes"),
    ("a = 1 b = 2", 1, "expected the end of the line or ';'"),
    ("x = 1\ndisk = ['a'\n 'b']", 3, "expected ',' or ']'"),
    ("disk = [\n'a',\n", 3, "unterminated list (the [ of disk on line 1"),
    ("disk = ['a',,'b']", 1, "expected a value"),
    ("a = 1\na += 2", 2, "+= cannot be used with numbers"),
    ("a = 'x'\na += ['y']", 2, "cannot add a list to a string"),
    ("a = (1, 2)", 1, "unexpected character '('"),
])
def test_syntax_errors(text, line, message):
    with pytest.raises(XlConfigError) as caught:
        parse_xl(text, "vm.cfg")
    assert caught.value.line == line
    assert str(caught.value).startswith(f"vm.cfg:{line}: ")
    assert message in str(caught.value)
    assert isinstance(caught.value, ConfigError)


def test_syntax_error_from_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"vm\.cfg:12: unterminated string"):
        load(HVM + "\n" * 9 + 'kernel = "/boot/vmlinuz\n', tmp_path)


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_xl_config(tmp_path / "missing.cfg")


# ---------------------------------------------------------------- refusals

def test_unknown_keys_are_listed_with_lines():
    error = error_of(HVM + "vnclisten = '0.0.0.0'\nmemory = 512\nusbdevice = ['tablet']\ncpus = '0-1'\n")
    assert str(error) == ("vm.cfg: pyvmm does not support these xl.cfg keys: "
                          "vnclisten (line 3), usbdevice (line 5), cpus (line 6)")


@pytest.mark.parametrize("text,message", [
    ('name = "g"\n', "no type="),
    ('name = "g"\ntype = "pv"\n', 'type="pv": pyvmm runs HVM guests only'),
    ('name = "g"\ntype = "pvh"\n', 'type="pvh": pyvmm runs HVM guests only'),
    ('name = "g"\ntype = "hvm-ish"\n', "expected \"hvm\""),
    ('name = "g"\nbuilder = "generic"\n', 'builder="generic" makes a PV guest'),
    ('name = "g"\nbuilder = "linux"\n', 'expected "hvm"'),
    ('name = "g"\ntype = "hvm"\nbuilder = "generic"\n', "contradicts"),
    ('type = "hvm"\n', "name= is missing"),
    ('type = "hvm"\nname = ""\n', "non-empty name"),
    ('type = "hvm"\nname = ["a"]\n', "name must be a single value"),
    (HVM + "memory = 1024\nmaxmem = 2048\n", "maxmem=2048 differs from memory=1024 MiB: pyvmm gives the guest all "
                                             "its memory at boot and does no ballooning"),
    (HVM + "vcpus = 2\nmaxvcpus = 4\n", "maxvcpus=4 differs from vcpus=2 vCPUs"),
    (HVM + "maxvcpus = 4\n", "maxvcpus=4 differs from vcpus (default 1)"),
    (HVM + "memory = 16\n", "at least 32"),
    (HVM + "memory = 513\n", "even number of MiB"),
    (HVM + "memory = 0\n", "memory must be positive"),
    (HVM + "memory = 'lots'\n", "memory must be a number"),
    (HVM + "vcpus = 65\n", "1 to 64 vCPUs"),
    (HVM + "kernel = ''\n", "kernel is empty"),
    (HVM + 'on_poweroff = "restart"\n', 'on_poweroff=\'restart\' is not supported: pyvmm ends (status 0)'),
    (HVM + 'on_crash = "restart"\n', "on_crash='restart' is not supported"),
    (HVM + 'on_crash = "preserve"\n', "on_crash='preserve' is not supported"),
    (HVM + 'on_crash = "coredump-destroy"\n', "coredump-destroy"),
    (HVM + 'on_reboot = "rename-restart"\n', 'use "destroy" or "restart"'),
    (HVM + 'on_reboot = "explode"\n', "is not an xl action"),
    (HVM + 'on_watchdog = "coredump-restart"\n', 'use "destroy" or "preserve" or "restart"'),
    (HVM + "acpi = 0\n", "acpi=0: pyvmm always gives the guest ACPI tables; set acpi=1"),
    (HVM + "xen_platform_pci = 0\n", "--no-xen"),
    (HVM + "vnc = 1\n", "no graphical console"),
    (HVM + "hpet = 1\n", "no HPET"),
    (HVM + "localtime = 1\n", "UTC"),
    (HVM + "viridian = ['base']\n", "Hyper-V"),
    (HVM + "boot = 'n'\n", "network boot"),
    (HVM + "vga = 'stdvga'\n", "no graphics card"),
    (HVM + "serial = 'vc'\n", "serial='vc'"),
    (HVM + "serial = 'file:'\n", "serial='file:'"),
    (HVM + "serial = ['pty', 'file:/x']\n", "one serial port"),
])
def test_refused_settings(text, message):
    error = error_of(text)
    assert message in str(error)


def test_refusal_points_at_the_line():
    error = error_of(HVM + "\n# comment\nmemory = 1024\nmaxmem = 4096\n")
    assert error.line == 6 and str(error).startswith("vm.cfg:6: maxmem=4096")


def test_bad_disk_in_a_multi_line_list_names_its_line():
    text = HVM + "disk = [\n  '/a.img,,xvda',\n  '/b.qcow2,qcow2,xvdb',\n]\n"
    error = error_of(text)
    assert error.line == 5
    assert "format qcow2 is not supported" in str(error)


def test_duplicate_devices():
    assert "vdev xvda is used twice (also on line 3)" in str(error_of(HVM + "disk=['/a,,xvda',\n'/b,,xvda']"))
    assert "vifname t0 is used twice" in str(error_of(HVM + "vif=['vifname=t0','vifname=t0,mac=02:00:00:00:00:01']"))


# ---------------------------------------------------------------- disk specs

@pytest.mark.parametrize("spec", [
    "/dev/vg/guest-volume,,hda",
    "/dev/vg/guest-volume,raw,hda,rw",
    "format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume",
    "raw:/dev/vg/guest-volume,hda,w",
    "phy:/dev/vg/guest-volume,hda,w",
    "tap:aio:/dev/vg/guest-volume,hda,w",
    "/dev/vg/guest-volume,,hda:disk",
    "vdev=hda,/dev/vg/guest-volume",
    "/dev/vg/guest-volume,raw,hda,rw,",
    "devtype=disk,/dev/vg/guest-volume,,hda",
    "  /dev/vg/guest-volume,  raw,  hda , w",
])
def test_equivalent_disk_specs(spec):
    disk, warnings = parse_disk_spec(spec)
    assert disk == DiskSpec(Path("/dev/vg/guest-volume"), "hda", False)
    assert warnings == []


@pytest.mark.parametrize("spec,readonly", [("/x,,xvda,r", True), ("/x,,xvda,ro", True), ("/x,,xvda,w", False),
                                           ("access=ro,/x,,xvda", True), ("/x,,xvda", False)])
def test_disk_access(spec, readonly):
    assert parse_disk_spec(spec)[0].readonly is readonly


def test_disk_backendtype_is_a_warning():
    disk, warnings = parse_disk_spec("/x,raw,xvda,rw,backendtype=qdisk")
    assert disk.vdev == "xvda" and len(warnings) == 1 and "backendtype=qdisk is ignored" in warnings[0]


@pytest.mark.parametrize("spec", ["/root/image.iso,,hdc,cdrom", "/root/image.iso,,hdc,,cdrom",
                                  "/root/image.iso,raw,hdc,devtype=cdrom", "raw:/root/image.iso,hdc:cdrom,ro",
                                  "/root/image.iso,raw,hdc:cdrom,r",
                                  "format=raw,vdev=hdc,devtype=cdrom,target=/root/image.iso"])
def test_cdrom_disk_specs(spec):
    disk, _ = parse_disk_spec(spec)
    assert disk.cdrom and disk.vdev == "hdc" and disk.path == Path("/root/image.iso")


def test_a_cdrom_entry_is_the_cdrom_not_a_disk():
    config = xl_config_from_text(HVM + "disk = ['/x.img,raw,hda,w', "
                                 "'/y.iso,raw,hdc:cdrom,r']\nboot = 'dc'\n")
    assert config.disks == (DiskSpec(Path("/x.img"), "hda", False),)
    options = config.to_run_options()
    assert options["cdrom"] == Path("/y.iso") and options["boot"] == "cdrom"
    # boot= means nothing to a kernel= boot
    assert xl_config_from_text(HVM + "kernel = '/k'\nboot = 'dc'\n").to_run_options().get("boot") is None


@pytest.mark.parametrize("disks,message", [
    ("'/y.iso,raw,hdd:cdrom,r'", "the secondary master, hdc (not hdd)"),
    ("'/y.iso,raw,hdc:cdrom,r', 'vdev=hdc,devtype=cdrom,target=/z.iso'", "vdev hdc is used twice"),
])
def test_refused_cdrom_entries(disks, message):
    with pytest.raises(ConfigError) as caught:
        xl_config_from_text(HVM + f"disk = [{disks}]\n")
    assert message in str(caught.value)


@pytest.mark.parametrize("spec,message", [
    (",hdc:cdrom,r", "an empty CD-ROM drive is not supported"),
    ("vdev=hdc,devtype=cdrom,target=", "an empty CD-ROM drive"),
    ("/x.qcow2,qcow2,xvda", "format qcow2 is not supported"),
    ("qcow2:/x.qcow2,xvda,w", "format qcow2 is not supported"),
    ("format=vhd,vdev=xvda,target=/x", "format vhd"),
    ("/x,fancy,xvda", "unknown disk format 'fancy'"),
    ("/x,,xvda,rx", "access 'rx'"),
    ("/x,,xvda,w,extra", "too many positional parameters"),
    ("/x,,xvda,mode=r", "mode= is not an xl disk parameter"),
    ("/x,,xvda,script=block-iscsi", "script= is not supported"),
    ("/x,,xvda,backend=driverdom", "backend= is not supported"),
    ("/x,,xvda,backendtype=magic", "unknown backendtype"),
    ("/x,,xvda,devtype=floppy", "unknown devtype"),
    ("/x,,xvda,colour=blue", "unknown disk parameter colour="),
    ("/x,,xvda,discard", "discard is not supported"),
    ("iscsi:iqn.2001-04.com.example:storage,xvda,w", "block script"),
    ("weird:/x,xvda,w", "unknown disk prefix weird:"),
    ("/x", "no vdev"),
    (",,xvda", "no target"),
    ("", "no target"),
    ("/x,,xvda:tape", "unknown device type 'tape'"),
    ("/x,,floppy0", "vdev 'floppy0' is not a disk name"),
    ("vdev=xvda,vdev=xvdb,target=/x", "vdev is given twice"),
    ("format=raw,format=raw,/x,xvda", "format is given twice"),
    ("access=r,access=w,/x,,xvda", "access is given twice"),
])
def test_refused_disk_specs(spec, message):
    with pytest.raises(ConfigError) as caught:
        parse_disk_spec(spec)
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"disk {spec!r}: ")


# ---------------------------------------------------------------- vif specs

def test_vif_specs():
    assert parse_vif_spec("vifname=vm0") == (VifSpec("vm0"), [])
    assert parse_vif_spec(" mac=02-00-00-0A-b-c , vifname=vm0 ,type=ioemu")[0] == VifSpec("vm0", "02:00:00:0a:0b:0c")
    vif, warnings = parse_vif_spec("vifname=vm0,ip=10.0.0.2,model=rtl8139,bridge=br0")
    assert vif == VifSpec("vm0") and len(warnings) == 3
    assert VifSpec("vm0", "02:00:00:00:00:01").option_text() == "tap=vm0,mac=02:00:00:00:00:01"


@pytest.mark.parametrize("spec,message", [
    ("", "no vifname="),
    ("mac=00:16:3e:00:00:01,bridge=xenbr0", "no vifname="),
    ("vifname=vm0,mac=00:16:3e:00:00", "not a MAC address"),
    ("vifname=vm0,mac=01:00:5e:00:00:01", "multicast"),
    ("vifname=vm0,script=vif-route", "script= is not supported"),
    ("vifname=vm0,rate=10Mb/s", "rate= is not supported"),
    ("vifname=vm0,mtu=9000", "mtu= is not supported"),
    ("vifname=vm0,backend=netdom", "backend= is not supported"),
    ("vifname=vm0,type=pci", "type 'pci'"),
    ("vifname=vm0,trusted", "trusted is not supported"),
    ("vifname=vm0,bogus", "unknown vif parameter 'bogus'"),
    ("vifname=vm0,colour=red", "unknown vif parameter colour="),
    ("vifname=a-very-long-interface-name", "not a valid network interface name"),
    ("vifname=a/b", "not a valid network interface name"),
])
def test_refused_vif_specs(spec, message):
    with pytest.raises(ConfigError) as caught:
        parse_vif_spec(spec)
    assert message in str(caught.value)


def test_default_vif_of_xlexample_is_refused_with_a_hint():
    error = error_of(HVM + "vif = [ '' ]\n")
    assert error.line == 3 and "ip tuntap add" in str(error)


def test_parse_mac():
    assert parse_mac("00:16:3E:74:3d:76") == "00:16:3e:74:3d:76"
    for bad in ("00:16:3e:74:3d", "00:16:3e:74:3d:7g", "00:16:3e:74:3d:100", "0016.3e74.3d76"):
        with pytest.raises(ConfigError):
            parse_mac(bad)


# ---------------------------------------------------------------- round trips

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_atoms = st.one_of(_text, st.integers(min_value=0, max_value=2**40))
_values = st.recursive(_atoms, lambda inner: st.lists(inner, max_size=4).map(tuple), max_leaves=12)
_keys = st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True)


@given(_values)
def test_value_round_trip(value):
    assert parse_xl(f"k = {format_xl_value(value)}")["k"].value == value


@given(st.dictionaries(_keys, _values, max_size=6))
def test_file_round_trip(settings):
    parsed = parse_xl(format_xl(settings))
    assert {key: setting.value for key, setting in parsed.items()} == settings


@given(st.lists(_text, max_size=5))
def test_multi_line_list_round_trip(items):
    text = "disk = [\n" + "".join(f"    {format_xl_value(item)},  # item\n" for item in items) + "]\n"
    setting = parse_xl(text)["disk"]
    assert setting.value == tuple(items)
    assert setting.item_lines == tuple(range(2, 2 + len(items)))


@given(st.binary(max_size=20))
def test_bytes_that_are_not_utf8_survive(data):
    value = data.decode("utf-8", "surrogateescape")
    assert parse_xl("k = " + format_xl_value(value))["k"].value == value


# Filtered as Path spells them: Path("\r/") is "\r", a target of only blanks, which is refused.
_paths = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1, max_size=30) \
    .map(Path).filter(lambda p: str(p).strip() and not str(p).endswith(",") and not str(p).startswith(" "))
_vdevs = st.from_regex(r"(xvd|hd|sd)[a-z]{1,2}[0-9]{0,2}", fullmatch=True)


@given(_paths, _vdevs, st.booleans())
def test_disk_round_trip(path, vdev, readonly):
    disk = DiskSpec(path, vdev, readonly)
    assert parse_disk_spec(disk.to_xl()) == (disk, [])
    # and through a whole config file
    config = xl_config_from_text(HVM + f"disk = [ {format_xl_value(disk.to_xl())} ]\n")
    assert config.disks == (disk,)


_taps = st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=15).filter(
    lambda name: name not in (".", ".."))
_macs = st.lists(st.integers(0, 255), min_size=6, max_size=6).map(
    lambda octets: ":".join(f"{o & 0xFE if i == 0 else o:02x}" for i, o in enumerate(octets)))


@given(_taps, st.none() | _macs)
def test_vif_round_trip(tap, mac):
    vif = VifSpec(tap, mac)
    assert parse_vif_spec(vif.to_xl()) == (vif, [])
    assert xl_config_from_text(HVM + f"vif = [{format_xl_value(vif.to_xl())}]").vifs == (vif,)


@settings(max_examples=300)
@given(st.text(max_size=60))
def test_parser_only_raises_config_errors(text):
    try:
        parse_xl(text)
    except XlConfigError as error:
        assert error.line is not None and 1 <= error.line <= text.count("\n") + 1


@pytest.mark.parametrize("action", ["destroy", "restart", "preserve"])
def test_on_watchdog(tmp_path, action):
    config = load(HVM + f'on_watchdog = "{action}"\n', tmp_path)
    assert config.on_watchdog == action
    assert config.to_run_options()["on_watchdog"] == action


def test_on_watchdog_absent_leaves_the_command_lines_default(tmp_path):
    assert "on_watchdog" not in load(HVM, tmp_path).to_run_options()
