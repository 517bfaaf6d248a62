"""--gdb / --gdb-wait: parsing, and the one-line errors of `pyvmm run`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pyvmm.config import ConfigError, GdbAddress, VmConfig


@pytest.mark.parametrize("text, host, port", [
    ("tcp:127.0.0.1:1234", "127.0.0.1", 1234),
    ("tcp:localhost:0", "localhost", 0),
    ("tcp:[::1]:65535", "::1", 65535),
])
def test_gdb_addresses(text, host, port):
    assert GdbAddress.parse(text) == GdbAddress(host, port)


@pytest.mark.parametrize("text", ["1234", "tcp:1234", "udp:127.0.0.1:1", "tcp:127.0.0.1:65536",
                                  "tcp:127.0.0.1:", "tcp::1", "tcp:a b:1", "tcp:127.0.0.1:1:2"])
def test_bad_gdb_addresses(text):
    with pytest.raises(ConfigError, match="expected tcp:HOST:PORT"):
        GdbAddress.parse(text)


def test_gdb_wait_needs_gdb(tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"x")
    with pytest.raises(ConfigError, match="--gdb-wait and --gdb-breakpoints need --gdb"):
        VmConfig(kernel=kernel, gdb_wait=True).validate()
    with pytest.raises(ConfigError, match="need --gdb"):
        VmConfig(kernel=kernel, gdb_breakpoints="debugregs").validate()
    VmConfig(kernel=kernel, gdb=GdbAddress("127.0.0.1", 0), gdb_wait=True).validate()


@pytest.mark.parametrize("args, message", [
    (["--gdb", "localhost:1234"], "--gdb 'localhost:1234': expected tcp:HOST:PORT"),
    (["--gdb-wait"], "--gdb-wait and --gdb-breakpoints need --gdb tcp:HOST:PORT"),
])
def test_cli_rejects_bad_gdb_options_in_one_line(tmp_path, args, message):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"x")
    done = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--kernel", str(kernel), *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith(f"pyvmm: error: {message}") and done.stderr.count("\n") == 1, done.stderr


def test_a_kvm_without_guest_debugging_is_refused_by_name():
    from pyvmm.gdbstub import check_guest_debug
    from pyvmm.kvm import KvmUnavailable, uapi
    from pyvmm.runner import describe_failure

    class KvmWithout:
        def check_extension(self, cap):
            return 0 if cap == uapi.KVM_CAP_SET_GUEST_DEBUG else 1

    with pytest.raises(KvmUnavailable) as raised:
        check_guest_debug(KvmWithout())
    assert "lacks KVM_CAP_SET_GUEST_DEBUG" in describe_failure(raised.value)
