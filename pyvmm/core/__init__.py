"""What every layer stands on: guest memory, the buses, the event loop, stop reasons,
the PC memory map, guest-shared atomics, tracing, fault rules, rate-limited logs,
the console sink and the per-user socket directory. Nothing here imports the rest of pyvmm."""
