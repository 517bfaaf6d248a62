"""xen-blkfront at ring level: a blkif ring on granted pages of guest RAM,
requests whose data pages are granted as blkfront grants them (read-only for
what the disk is to write), and a BlockBackend serving them from an image
file, attached as the vbd attaches it once the handshake is done."""

from __future__ import annotations

import random

from pyvmm.xen.backends.blk import blkif
from pyvmm.xen.backends.blk.blkback import BlockBackend, DiskImage
from pyvmm.xen.hv import gnttab

from .common import PAGE, GuestPages

RAM_PAGES = 2048
GUEST_PAGES_START = 32  # data pages handed out from here on
DISK_SECTORS = 2048  # 1 MiB
PROTOCOLS = ["x86_64-abi", "x86_32-abi"]


class Blkfront(GuestPages):
    """A frontend: guest RAM, its grant table, a ring and a disk image."""

    def __init__(self, tmp_path, protocol="x86_64-abi", *, ring_pages=1, sectors=DISK_SECTORS, readonly=False,
                 sector_size=512, image_bytes=None, queue=0, persistent=False, **backend_options):
        super().__init__(RAM_PAGES, first_gfn=GUEST_PAGES_START, max_frames=8)
        self.abi = blkif.abi_for_protocol(protocol)
        self.protocol = protocol
        self.path = tmp_path / "disk.img"
        if image_bytes is None:
            image_bytes = random.Random(sectors).randbytes(sectors * 512)
        self.path.write_bytes(image_bytes)
        self.image = DiskImage(self.path, readonly=readonly, sector_size=sector_size)
        self.notified = 0
        self.backend = BlockBackend(self.image, self.table, self.notify, **backend_options)
        # Ring pages at scattered frames (every other page), as a real frontend
        # may have them; the backend maps each grant on its own.
        self.front, self.ring_refs = self.front_ring([2 + 2 * i for i in range(ring_pages)], self.abi.entry_size)
        self.ring_mappings = self.map_for_backend(self.ring_refs)
        self.backend.attach_ring([m.view for m in self.ring_mappings], protocol, queue=queue, persistent=persistent)

    def notify(self):
        self.notified += 1

    # --- grants and pages ----------------------------------------------------------

    def page(self, data=None, *, readonly=False):
        """A fresh guest page, granted; returns (ref, gfn)."""
        gfn = self.new_gfn()
        if data is not None:
            self.memory.write(gfn * PAGE, data)
        return self.grant(gfn, readonly=readonly), gfn

    def page_bytes(self, gfn, first=0, last=7):
        return self.memory.read(gfn * PAGE + first * 512, (last - first + 1) * 512)

    # --- requests --------------------------------------------------------------------

    def submit(self, *requests):
        for request in requests:
            self.front.put_request(request)
        return self.front.push_requests()

    def rw(self, op, request_id, sector, segments, **kw):
        return blkif.pack_request(self.abi, op, request_id, sector, segments, **kw)

    def run(self, *requests):
        """Submit, let the backend process, return {id: (operation, status)}."""
        if requests:
            self.submit(*requests)
        self.backend.process()
        responses = {}
        for raw in self.front.take_responses():
            request_id, op, status = blkif.parse_response(raw, self.abi)
            assert request_id not in responses
            responses[request_id] = (op, status)
        return responses

    def disk(self, sector=0, count=None):
        data = self.path.read_bytes()  # plain open(): what is really in the file
        if count is None:
            return data[sector * 512 :]
        return data[sector * 512 : (sector + count) * 512]

    def assert_grants_released(self):
        for ref in range(gnttab.GNTTAB_NR_RESERVED_ENTRIES, self.next_ref):
            if ref in self.ring_refs:
                continue
            assert not self.entry_flags(ref) & gnttab.GTF_IN_USE, f"grant {ref} still in use"
