"""XenDomain.count_into (--stats): the guest's xenstore connection and the
dispatcher's event-channel sends are counted, into the counters of the
threads that serve them."""

from types import SimpleNamespace

from pyvmm.core.stats import Counters
from pyvmm.xen.domain import XenDomain
from pyvmm.xen.hv.hypercalls import HypercallDispatcher
from pyvmm.xen.xenstore import XenStore, create_domain_nodes
from pyvmm.xen.xenstore.protocol import encode_message
from pyvmm.xen.xenstore import Op


def test_count_into_wraps_the_guests_connection_and_the_send_handler():
    store = XenStore()
    create_domain_nodes(store, 1, "guest", 1, 0xFEFF9, 2, 0xFEFF8)
    connection = store.connect(1)
    dispatcher = HypercallDispatcher(SimpleNamespace(evtchn=None, domid=1))
    before = dispatcher.handlers["event_channel_op"]
    domain = SimpleNamespace(xenstore=SimpleNamespace(connection=connection), dispatcher=dispatcher)
    event, vcpus = Counters(), [Counters(), Counters()]

    XenDomain.count_into(domain, event, vcpus)

    connection.feed(encode_message(Op.READ, 1, 0, b"domid\0"))
    assert event.counters[("xenstore", "READ")][0] == 1
    assert dispatcher.handlers["event_channel_op"] is not before
