"""One VM for one boot: the machine, exit handling, vCPU set-up and liveness."""
