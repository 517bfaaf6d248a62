"""What a PV backend is built on: shared rings, ring worker threads and the xenbus
handshake with the frontend."""
