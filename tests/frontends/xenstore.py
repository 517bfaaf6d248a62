"""Linux's xenbus client of the xenstore (drivers/xen/xenbus): over the
ring page (struct xenstore_domain_interface) as xb_write() and xb_read()
drive it, or as whole wire messages on a store connection, without the
ring."""

from __future__ import annotations

from pyvmm.xen.xenstore import Op
from pyvmm.xen.xenstore.protocol import encode_message, iter_messages
from pyvmm.xen.xenstore.ring import REQ_CONS, REQ_OFFSET, REQ_PROD, RING_SIZE, RSP_CONS, RSP_OFFSET, RSP_PROD

from .common import MASK32, SharedPage


class XenbusRing(SharedPage):
    """The guest's half of the ring, as a Linux xenbus driver would drive it."""

    def __init__(self, page: memoryview):
        super().__init__(page)
        self.received = b""

    def send(self, data: bytes) -> int:
        """Write as much of data as fits; returns how much."""
        prod = self.u32(REQ_PROD)
        count = self.ring_put(REQ_OFFSET, RING_SIZE, prod, self.u32(REQ_CONS), data)
        self.set_u32(REQ_PROD, prod + count)
        return count

    def receive(self) -> bytes:
        cons, prod = self.u32(RSP_CONS), self.u32(RSP_PROD)
        assert (prod - cons) & MASK32 <= RING_SIZE
        data = self.ring_take(RSP_OFFSET, RING_SIZE, cons, prod)
        self.set_u32(RSP_CONS, cons + len(data))
        self.received += data
        return data

    def messages(self):
        return [(h.type, h.req_id, p) for h, p in iter_messages(self.received)]


class XenbusWire:
    """A domain talking the xenstore wire protocol on `connection`, one
    request at a time, as over its ring: each answer is the last reply that
    is not a watch event."""

    def __init__(self, connection):
        self.conn = connection
        self.req = 0

    def _request(self, op: Op, payload: bytes, tx: int) -> tuple[str, bytes]:
        self.req += 1
        self.conn.feed(encode_message(op, self.req, tx, payload))
        replies = [(h, p) for h, p in iter_messages(self.conn.take_output(1 << 20)) if h.type != Op.WATCH_EVENT]
        header, payload = replies[-1]
        return ("ERROR" if header.type == Op.ERROR else Op(header.type).name), payload

    def ask(self, op: Op, *args: bytes, tx: int = 0) -> tuple[str, bytes]:
        """(the reply's type name, its payload)."""
        return self._request(op, b"".join(arg + b"\0" for arg in args), tx)

    def write(self, path: str, value: bytes = b"", tx: int = 0) -> tuple[str, bytes]:
        return self._request(Op.WRITE, path.encode() + b"\0" + value, tx)
