"""The PV block backend: the xenbus device (vbd), the blkif protocol and blkback."""
