"""Firmware boot from the emulated CD-ROM drive (--cdrom ISO, secondary master).

On any host with /dev/kvm: SeaBIOS finds the ATAPI drive, reads El Torito's
boot record and catalog and runs the boot image of a CD made here
(iso_image.py, no tools needed), which prints through the BIOS.

With Xen guests: a GRUB CD (grub-mkrescue: grub-pc-bin and xorriso) boots
the guest kernel, whose /test.sh loads the ATA and CD-ROM drivers (from
the kernel package beside the guest assets: the initramfs holds Xen's
modules only), mounts /dev/sr0 and reads a file of the CD.
"""

from __future__ import annotations

import lzma
import os
import subprocess
from pathlib import Path

import pytest

from disk_image import DiskToolsMissing
from initrd import make_test_initrd
from iso_image import make_eltorito_iso, make_grub_iso, print_boot_code
from vmm import run_pyvmm, xen_guest_assets

FIRMWARE = "/usr/share/seabios/bios-256k.bin"


def _need_firmware() -> None:
    if not os.path.exists(FIRMWARE):
        pytest.skip(f"{FIRMWARE} is missing: apt-get install seabios")


def test_seabios_boots_an_el_torito_cd(tmp_path):
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this host")
    _need_firmware()
    iso = make_eltorito_iso(tmp_path / "boot.iso", print_boot_code(b"pyvmm-cd-boot: ran from the CD\r\n"))
    # No Xen: the CD-ROM is an emulated drive, not a Xen PV device.
    result = run_pyvmm("run", "--no-xen", "--cdrom", str(iso), "--timeout", "120",
                       "--expect", "pyvmm-cd-boot: ran from the CD", "-v", timeout=200)
    assert result.status == 0, str(result)
    assert "Booting from DVD/CD" in result.stdout, str(result)
    assert "DVD/CD [ata1-0: PYVMM DVD-ROM ATAPI" in result.stderr, result  # SeaBIOS's probe, in the log


# What the guest needs to see a CD-ROM on the PIIX IDE controller, in load order.
CDROM_MODULES = ["libata", "ata_piix", "cdrom", "sr_mod", "isofs"]
CD_FILE = "pyvmm-cd.txt"
CD_MARKER = "cd-marker-5c41"
TEST_SCRIPT = f"""
modprobe scsi_mod || exit 1
for module in {' '.join(CDROM_MODULES)}; do insmod /lib/cdrom/$module.ko || exit 1; done
tries=0
while [ ! -b /dev/sr0 ] && [ $tries -lt 60 ]; do sleep 1; tries=$((tries + 1)); done
mkdir -p /mnt/cd
mount -t iso9660 -o ro /dev/sr0 /mnt/cd || exit 1
echo "cdrom-boot: files: $(ls /mnt/cd | tr '\\n' ' ')"
grep -q {CD_MARKER} /mnt/cd/{CD_FILE}
"""


def _cdrom_modules(assets: dict, scratch: Path) -> dict[str, bytes]:
    """The modules, from the kernel package guest-assets downloaded: {guest path: bytes}."""
    release = assets["kernel_release"]
    debs = sorted((assets["dir"].parent / "debs").glob(f"linux-image-{release}_*.deb"))
    if not debs:
        pytest.skip(f"the kernel package of {release} is not in {assets['dir'].parent / 'debs'} "
                    "(its ATA and CD-ROM modules are not in the guest initramfs)")
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(scratch)], check=True, capture_output=True)
    tree = scratch / "lib" / "modules" / release
    files = {}
    for name in CDROM_MODULES:
        found = sorted(tree.rglob(f"{name}.ko")) or sorted(tree.rglob(f"{name}.ko.xz"))
        if not found:
            pytest.skip(f"{name}.ko is not in the kernel package (built in?)")
        data = found[0].read_bytes()
        files[f"lib/cdrom/{name}.ko"] = lzma.decompress(data) if found[0].suffix == ".xz" else data
    return files


@pytest.mark.guest
@pytest.mark.xen
@pytest.mark.slow
def test_linux_mounts_the_cd_it_booted_from(tmp_path):
    _need_firmware()
    assets = xen_guest_assets()
    modules = _cdrom_modules(assets, tmp_path / "kernel")
    initrd = make_test_initrd(assets["initramfs"], tmp_path / "initrd", TEST_SCRIPT, modules)
    try:
        iso = make_grub_iso(tmp_path / "linux.iso", assets["vmlinuz"], initrd, "console=ttyS0 panic=-1",
                            {CD_FILE: f"{CD_MARKER}\n".encode()}, title="pyvmm cdrom test")
    except DiskToolsMissing as error:
        pytest.skip(str(error))
    result = run_pyvmm("run", "--cdrom", str(iso), "--no-reboot", "--timeout", "300", "-v", timeout=400)
    assert result.status == 0, str(result)
    out = result.stdout
    assert "Booting from DVD/CD" in out, result  # SeaBIOS, on COM1
    assert "pyvmm cdrom test" in out and "pyvmm-disk: loading the kernel" in out, result  # GRUB's menu
    assert "cdrom-boot: files: " in out and CD_FILE in out, str(result)
    assert "pyvmm-guest: test exit 0" in out, str(result)
