"""Looking inside a guest: the gdb stub and the trace viewer."""
