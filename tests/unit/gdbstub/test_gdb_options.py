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
    ("tcp:1234", "127.0.0.1", 1234),  # no host: loopback, not every address
    ("tcp::1", "127.0.0.1", 1),
    ("tcp:0.0.0.0:1234", "0.0.0.0", 1234),  # parsed; refused by validate() without --gdb-allow-remote
])
def test_gdb_addresses(text, host, port):
    assert GdbAddress.parse(text) == GdbAddress(host, port)


def test_gdb_unix_socket_address():
    address = GdbAddress.parse("unix:/run/user/1000/guest.gdb")
    assert address.path == "/run/user/1000/guest.gdb" and address.is_loopback
    assert str(address) == "unix:/run/user/1000/guest.gdb"


@pytest.mark.parametrize("text", ["1234", "udp:127.0.0.1:1", "tcp:127.0.0.1:65536", "tcp:127.0.0.1:", "tcp:",
                                  "tcp:a b:1", "tcp:127.0.0.1:1:2", "localhost:1234"])
def test_bad_gdb_addresses(text):
    with pytest.raises(ConfigError, match="expected tcp:PORT, tcp:HOST:PORT or unix:PATH"):
        GdbAddress.parse(text)


def test_bad_gdb_unix_address():
    with pytest.raises(ConfigError, match="expected unix:PATH"):
        GdbAddress.parse("unix:")


@pytest.mark.parametrize("text, loopback", [
    ("tcp:127.0.0.1:1", True), ("tcp:127.1.2.3:1", True), ("tcp:[::1]:1", True), ("tcp:localhost:1", True),
    ("tcp:0.0.0.0:1", False), ("tcp:[::]:1", False), ("tcp:192.168.1.5:1", False), ("tcp:build-host:1", False),
])
def test_which_addresses_are_loopback(text, loopback):
    assert GdbAddress.parse(text).is_loopback is loopback


def test_gdb_wait_needs_gdb(tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"x")
    with pytest.raises(ConfigError, match="--gdb-wait, --gdb-breakpoints and --gdb-allow-remote need --gdb"):
        VmConfig(kernel=kernel, gdb_wait=True).validate()
    with pytest.raises(ConfigError, match="need --gdb"):
        VmConfig(kernel=kernel, gdb_breakpoints="debugregs").validate()
    with pytest.raises(ConfigError, match="need --gdb"):
        VmConfig(kernel=kernel, gdb_allow_remote=True).validate()
    VmConfig(kernel=kernel, gdb=GdbAddress("127.0.0.1", 0), gdb_wait=True).validate()


def test_a_remote_gdb_address_needs_the_opt_in(tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"x")
    for text in ("tcp:0.0.0.0:1234", "tcp:[::]:1234", "tcp:build-host:1234"):
        with pytest.raises(ConfigError, match="no authentication.*--gdb-allow-remote"):
            VmConfig(kernel=kernel, gdb=GdbAddress.parse(text)).validate()
        VmConfig(kernel=kernel, gdb=GdbAddress.parse(text), gdb_allow_remote=True).validate()
    VmConfig(kernel=kernel, gdb=GdbAddress.parse("unix:/tmp/x.gdb")).validate()


@pytest.mark.parametrize("args, message", [
    (["--gdb", "localhost:1234"], "--gdb 'localhost:1234': expected tcp:PORT, tcp:HOST:PORT or unix:PATH"),
    (["--gdb-wait"], "--gdb-wait, --gdb-breakpoints and --gdb-allow-remote need --gdb tcp:PORT"),
    (["--gdb", "tcp:0.0.0.0:1234"], "--gdb tcp:0.0.0.0:1234: the gdb stub has no authentication, so pyvmm "
                                    "listens only on loopback (tcp::1234) or a unix:PATH unless "
                                    "--gdb-allow-remote is given"),
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
