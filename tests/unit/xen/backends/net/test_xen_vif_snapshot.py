"""VifDevice.save_state()/restore_state(): a connected vif saved with
receive buffers the guest posted and the backend took (but no frame filled
yet), restored with the grant table, event channels and xenstore into a
freshly built VM over a new transport: the next frame lands in the next
posted buffer, and the guest's transmits reach the new transport."""

import json
import socket
from types import SimpleNamespace

import pytest

from frontends.common import PAGE
from frontends.netfront import tcp4_frame
from frontends.xenbus import DOMID, Domain
from pyvmm.core.snapshot import SnapshotError
from pyvmm.xen.abi import DOMID_SELF
from pyvmm.xen.backend.ring import FrontRing
from pyvmm.xen.backend.xenbus_backend import XenbusState
from pyvmm.xen.backends.net import netif
from pyvmm.xen.backends.net import tap as tapmod
from pyvmm.xen.backends.net.vif import VifDevice
from pyvmm.xen.hv.gnttab import GTF_IN_USE


class Vm:
    """A built VM with one vif over a socket pair standing in for its TAP."""

    def __init__(self):
        self.domain = Domain()
        loop = self.domain.loop
        loop.add_reader = lambda fd, callback: None
        loop.remove_reader = lambda fd: None
        loop.call_later = lambda delay, callback: loop.schedule(callback)
        self.host, tap_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        tap_end.setblocking(False)
        self.host.settimeout(5)
        self.tap_end = tap_end
        tap = SimpleNamespace(fd=tap_end.fileno(), name="test0", set_offload=lambda flags: None, close=lambda: None)
        self.device = VifDevice(self.domain.store, DOMID, 0, tap, "00:16:3e:00:00:01", self.domain.gnttab,
                                self.domain.evtchn, loop)
        self.device.start()
        loop.run()

    def close(self):
        self.device.close()
        self.host.close()
        self.tap_end.close()


class Netfront:
    """xen-netfront's handshake and rings, over the guest's own xenstore client."""

    def __init__(self, vm, *, gfns=None, ports=None, rx_ids=None):
        self.vm, domain = vm, vm.domain
        self.path = vm.device.frontend_path
        if gfns is None:  # a fresh connection
            tx_gfn, rx_gfn = domain.page(), domain.page()
            self.tx_ref, self.rx_ref = domain.grant(tx_gfn), domain.grant(rx_gfn)
            self.gfns = (tx_gfn, rx_gfn)
            self.ports = [domain.evtchn.alloc_unbound(DOMID_SELF, 0) for _ in range(2)]
            self.tx = FrontRing([domain.memory.view(tx_gfn * PAGE, PAGE)], netif.TX_ENTRY_SIZE)
            self.rx = FrontRing([domain.memory.view(rx_gfn * PAGE, PAGE)], netif.RX_ENTRY_SIZE)
            self.rx_pages = {}
        else:  # the same guest after a restore: its rings are in the restored RAM
            self.gfns, self.ports, self.rx_pages = gfns, ports, rx_ids
            self.tx = FrontRing([domain.memory.view(gfns[0] * PAGE, PAGE)], netif.TX_ENTRY_SIZE, init=False)
            self.rx = FrontRing([domain.memory.view(gfns[1] * PAGE, PAGE)], netif.RX_ENTRY_SIZE, init=False)

    def connect(self):
        xs = self.vm.domain.guest
        with xs.transaction() as tx:
            for key, value in {"tx-ring-ref": self.tx_ref, "rx-ring-ref": self.rx_ref,
                               "event-channel-tx": self.ports[0], "event-channel-rx": self.ports[1],
                               "request-rx-copy": 1, "feature-rx-notify": 1, "feature-sg": 1}.items():
                xs.write(f"{self.path}/{key}", str(value), tx)
        xs.write(f"{self.path}/state", str(int(XenbusState.CONNECTED)))
        self.vm.domain.loop.run()

    def post_rx(self, count):
        domain = self.vm.domain
        for _ in range(count):
            request_id = self.rx.req_prod_pvt & 0xFFFF
            gfn = domain.page()
            self.rx_pages[request_id] = gfn
            self.rx.put_request(netif.pack_rx_request(request_id, domain.grant(gfn)))
        self.rx.push_requests()
        domain.evtchn.send(self.ports[1])
        domain.loop.run()

    def receive(self, frame):
        self.vm.host.send(tapmod.VNET_HDR.pack(0, 0, 0, 0, 0, 0) + frame)
        self.vm.device.backend.process_rx()  # what the loop does when the TAP is readable
        return [netif.parse_rx_response(raw) for raw in self.rx.take_responses()]

    def send(self, frame):
        domain = self.vm.domain
        gfn = domain.page()
        domain.memory.write(gfn * PAGE, frame)
        self.tx.put_request(netif.pack_tx_request(domain.grant(gfn, readonly=True), 0, 0, 7, len(frame)))
        self.tx.push_requests()
        domain.evtchn.send(self.ports[0])
        domain.loop.run()
        return [netif.parse_tx_response(raw) for raw in self.tx.take_responses()]


def save(vm):
    domain = vm.domain
    state = {"gnttab": domain.gnttab.save_state(), "evtchn": domain.evtchn.save_state(),
             "store": domain.store.save_state(), "vif": vm.device.save_state(),
             "ram": domain.memory.read(0, 1024 * PAGE).hex()}
    return json.loads(json.dumps(state))


def restore(state, old):
    vm = Vm()  # built as at boot, with a new transport
    domain = vm.domain
    domain.memory.write(0, bytes.fromhex(state["ram"]))
    domain.next_gfn, domain.next_ref = old.domain.next_gfn, old.domain.next_ref
    domain.gnttab.restore_state(state["gnttab"])
    domain.evtchn.restore_state(state["evtchn"])
    domain.store.restore_state(state["store"])
    vm.device.restore_state(state["vif"])
    domain.evtchn.finish_restore()
    domain.loop.run()
    return vm


@pytest.fixture
def connected():
    vm = Vm()
    front = Netfront(vm)
    front.connect()
    assert vm.device.connected
    yield vm, front
    vm.close()


def test_a_restored_vif_fills_the_buffers_the_guest_had_posted(connected):
    vm, front = connected
    front.post_rx(3)
    first = tcp4_frame(b"before")
    responses = front.receive(first)  # takes all three buffers, fills one
    assert [r[0] for r in responses] == [0]
    state = save(vm)
    assert state["vif"]["connection"]["posted_rx"] == [[1, vm.device.backend._rx_posted[0].ref],
                                                       [2, vm.device.backend._rx_posted[1].ref]]
    rsp_cons = (front.tx.rsp_cons, front.rx.rsp_cons)

    new = restore(state, vm)
    try:
        assert new.device.connected and new.device.state == XenbusState.CONNECTED
        posted_refs = [ref for _, ref in state["vif"]["connection"]["posted_rx"]]
        assert all(new.domain.entry_flags(ref) & GTF_IN_USE for ref in posted_refs)  # mapped again
        again = Netfront(new, gfns=front.gfns, ports=front.ports, rx_ids=front.rx_pages)
        again.tx.rsp_cons, again.rx.rsp_cons = rsp_cons
        frame = tcp4_frame(b"after the restore")
        responses = again.receive(frame)
        assert [r[0] for r in responses] == [1] and responses[0][3] == len(frame)
        assert new.domain.memory.read(again.rx_pages[1] * PAGE + responses[0][1], len(frame)) == frame
        assert again.send(tcp4_frame(b"out")) == [(7, netif.XEN_NETIF_RSP_OKAY)]
        assert new.host.recv(1 << 16)[tapmod.VNET_HDR_SIZE:] == tcp4_frame(b"out")
    finally:
        new.close()


def test_a_round_in_progress_refuses_the_save(connected, monkeypatch):
    vm, front = connected
    front.post_rx(1)
    front.receive(tcp4_frame())
    vm.device.backend._rx_responses += b"x" * 8  # a round that did not finish
    with pytest.raises(SnapshotError, match="in progress"):
        vm.device.save_state()
    vm.device.backend._rx_responses.clear()


@pytest.mark.parametrize("change", [
    lambda s: s.update(version=9),
    lambda s: s["xenbus"].update(devid=3),
    lambda s: s["connection"].update(ports=[1, 2, 3]),
    lambda s: s["connection"].update(posted_rx=[[1, "x"]]),
    lambda s: s["connection"].update(posted_rx=[[i, 9] for i in range(40)]),  # more than the guest posted
    lambda s: s["connection"]["features"].update(sg="yes"),
    lambda s: s["connection"]["channels"][1].update(dom0_port=50),
    lambda s: s["connection"].update(tx_ref=4000),  # not granted
])
def test_bad_states_are_refused(connected, change):
    vm, front = connected
    front.post_rx(2)
    front.receive(tcp4_frame())
    state = save(vm)
    change(state["vif"])
    with pytest.raises(SnapshotError):
        restore(state, vm).close()
