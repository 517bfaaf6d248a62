"""Framing on the single virtio-serial channel between the host and the L1 agent.

Every message is a frame: one type byte, a 4-byte big-endian payload length,
the payload.  One ordered channel carries stdout, stderr and the exit status,
so the exit frame can only arrive after all of the command's output.

Used on both sides; stdlib only, and importable by a Python started with -S.
"""

import struct

HEADER = struct.Struct(">BI")
# Output is sent in chunks far below this; only the job description (argv and
# environment as JSON) can be large.
MAX_PAYLOAD = 16 << 20

# host -> agent
JOB = 1          # JSON: what to run and how (see host.build_job)
STDIN = 2        # bytes for the command's stdin
STDIN_EOF = 3    # the caller's stdin ended
WINSIZE = 4      # u16 rows, u16 cols: the caller's terminal was resized
SHOW_STACKS = 5  # put L1's blocked tasks' stacks and its CPUs' backtraces on its console

# agent -> host
HELLO = 64       # L1 is up; payload: the L1 kernel release
STARTED = 65     # the command was started (its timeout runs from here)
STDOUT = 66
STDERR = 67
TTY = 68         # output of the L1 terminal (the caller's terminal gets it)
STDIN_ACK = 69   # u32: bytes of stdin consumed, returning flow-control credit
EXIT = 70        # i32: the command's exit status, shell style
FAILED = 71      # the testbed itself failed in L1; payload: a one-line reason
CHECK = 72       # JSON: result of a capability check job
ALIVE = 73       # L1 still runs (every agent.ALIVE_SECONDS); payload: its /proc/loadavg
KALLSYMS = 74    # zlib of L1's text symbols from /proc/kallsyms (asked for by the job's "kallsyms")

WINSIZE_FORMAT = struct.Struct(">HH")
U32 = struct.Struct(">I")
I32 = struct.Struct(">i")


class ProtocolError(Exception):
    pass


def encode(kind, payload=b""):
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError("frame payload of %d bytes is too large" % len(payload))
    return HEADER.pack(kind, len(payload)) + bytes(payload)


class Decoder:
    """Turns a byte stream, fed in arbitrary pieces, back into frames."""

    def __init__(self, max_payload=MAX_PAYLOAD):
        self._buffer = bytearray()
        self._max_payload = max_payload

    def feed(self, data):
        """Adds bytes; returns the list of (kind, payload) frames now complete."""
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER.size:
            kind, length = HEADER.unpack_from(self._buffer)
            if length > self._max_payload:
                raise ProtocolError("frame announces %d bytes, more than the limit of %d"
                                    % (length, self._max_payload))
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            frames.append((kind, bytes(self._buffer[HEADER.size:end])))
            del self._buffer[:end]
        return frames

    @property
    def pending(self):
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)


def exit_status(wait_status):
    """A shell's view of a wait() status: the exit code, or 128 + signal number."""
    import os
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    raise ValueError("wait status %#x is neither an exit nor a signal" % wait_status)
