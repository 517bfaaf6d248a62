"""The PV backends, one folder per device kind: blk (vbd), net (vif), console."""
