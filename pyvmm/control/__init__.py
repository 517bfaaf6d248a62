"""Operating a running VM: the control socket (server) and its command set (operations)."""
