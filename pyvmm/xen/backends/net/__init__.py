"""The PV network backend: the xenbus device (vif), the netif protocol, netback and
the host's TAP device."""
