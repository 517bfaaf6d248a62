"""Unit tests for the pure parts of scripts/testbed (scripts/testbed.d/pyvmm_testbed)."""

import json
import lzma
import os
import socket
import struct
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "testbed.d"))

from pyvmm_testbed import agent, build, cli, host, provision, wire  # noqa: E402


# -- wire ---------------------------------------------------------------------

def test_frames_survive_any_split():
    frames = [(wire.STDOUT, b"out"), (wire.STDERR, b""), (wire.EXIT, wire.I32.pack(-3)),
              (wire.STDIN, bytes(range(256)) * 300)]
    stream = b"".join(wire.encode(kind, payload) for kind, payload in frames)
    for piece in (1, 2, 5, 7, 4096, len(stream)):
        decoder = wire.Decoder()
        received = []
        for start in range(0, len(stream), piece):
            received += decoder.feed(stream[start:start + piece])
        assert received == frames
        assert decoder.pending == 0


def test_decoder_rejects_oversized_frame_announcement():
    decoder = wire.Decoder(max_payload=10)
    with pytest.raises(wire.ProtocolError):
        decoder.feed(wire.HEADER.pack(wire.STDOUT, 11))


def test_encode_rejects_oversized_payload():
    with pytest.raises(wire.ProtocolError):
        wire.encode(wire.JOB, b"x" * (wire.MAX_PAYLOAD + 1))


def test_exit_status_follows_the_shell():
    assert wire.exit_status(7 << 8) == 7
    assert wire.exit_status(9) == 128 + 9       # killed by SIGKILL


# -- kernel modules -------------------------------------------------------------

def make_module_elf(modinfo):
    """A minimal ELF64 LE relocatable with a .modinfo section holding `modinfo`."""
    names = b"\0.modinfo\0.shstrtab\0"
    body = b"\0".join(entry.encode() for entry in modinfo) + b"\0"
    header_size, section_size = 64, 64
    modinfo_offset = header_size
    names_offset = modinfo_offset + len(body)
    table_offset = names_offset + len(names)
    elf = bytearray(b"\x7fELF" + bytes([2, 1, 1]) + bytes(9))
    elf += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, table_offset, 0,
                       header_size, 0, 0, section_size, 3, 2)
    elf += body + names
    elf += bytes(section_size)                                                 # null section
    elf += struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, modinfo_offset, len(body), 0, 0, 1, 0)
    elf += struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, names_offset, len(names), 0, 0, 1, 0)
    return bytes(elf)


def test_modinfo_depends_reads_the_depends_entry():
    elf = make_module_elf(["license=GPL", "depends=kvm,ccp", "name=kvm_amd"])
    assert build.modinfo_depends(elf) == ["kvm", "ccp"]
    assert build.modinfo_depends(make_module_elf(["depends=", "name=irqbypass"])) == []
    assert build.modinfo_depends(make_module_elf(["depends=nf-conntrack"])) == ["nf_conntrack"]


def test_modinfo_depends_rejects_garbage():
    with pytest.raises(build.BuildError):
        build.modinfo_depends(b"not an elf file at all" * 4)
    truncated = make_module_elf(["depends=kvm"])[:80]
    with pytest.raises(build.BuildError):
        build.modinfo_depends(truncated)


def test_module_name_normalizes_like_the_kernel():
    assert build.module_name("/x/kvm-amd.ko.xz") == "kvm_amd"
    assert build.module_name("9pnet_virtio.ko") == "9pnet_virtio"
    assert build.module_name("kvm-amd") == "kvm_amd"


def test_load_order_puts_dependencies_first_and_once():
    graph = {"kvm_amd": ["kvm", "ccp"], "kvm": ["irqbypass"], "ccp": [], "irqbypass": [],
             "bridge": ["stp", "llc"], "stp": ["llc"], "llc": []}
    order = build.load_order(["kvm-amd", "bridge", "kvm"], graph.__getitem__)
    assert order == ["irqbypass", "kvm", "ccp", "kvm_amd", "llc", "stp", "bridge"]


def test_load_order_reports_cycles():
    graph = {"a": ["b"], "b": ["c"], "c": ["a"]}
    with pytest.raises(build.BuildError, match="a -> b -> c -> a"):
        build.load_order(["a"], graph.__getitem__)


def test_module_tree_resolves_packaged_modules(tmp_path):
    root = tmp_path / "6.12.0-test"
    modules = {"kernel/arch/x86/kvm/kvm-amd.ko.xz": "kvm,ccp",
               "kernel/arch/x86/kvm/kvm.ko.xz": "irqbypass",
               "kernel/virt/lib/irqbypass.ko.xz": "",
               "kernel/drivers/crypto/ccp/ccp.ko.xz": "",
               "kernel/net/bridge/bridge.ko": "stp"}
    for path, depends in modules.items():
        elf = make_module_elf(["depends=" + depends])
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(lzma.compress(elf) if path.endswith(".xz") else elf)
    (root / "modules.builtin").write_text("kernel/net/802/stp.ko\n")
    tree = build.ModuleTree(str(root))
    assert tree.resolve(["kvm_amd", "bridge"]) == ["irqbypass", "kvm", "ccp", "kvm_amd", "bridge"]
    written = tree.materialize(["kvm"], str(tmp_path / "out"))
    assert open(written[0], "rb").read() == make_module_elf(["depends=irqbypass"])
    with pytest.raises(build.BuildError, match="has no module no_such_module, other_one"):
        tree.resolve(["kvm", "no_such_module", "other-one"])
    assert tree.missing(["stp", "kvm", "gone"]) == ["gone"]
    (root / "kernel/net/bridge/bridge.ko").write_bytes(make_module_elf(["depends=llc"]))
    with pytest.raises(build.BuildError, match="'llc' does not exist"):
        build.ModuleTree(str(root)).resolve(["bridge"])


# -- cpio -----------------------------------------------------------------------

def read_newc(data):
    """An independent reader for the newc format, to check the writer against."""
    entries, offset = [], 0
    while True:
        assert data[offset:offset + 6] == b"070701"
        fields = [int(data[offset + 6 + 8 * i: offset + 14 + 8 * i], 16) for i in range(13)]
        name_size, file_size = fields[11], fields[6]
        name_start = offset + 110
        name = data[name_start:name_start + name_size - 1].decode()
        assert data[name_start + name_size - 1] == 0
        body_start = (name_start + name_size + 3) & ~3
        body = data[body_start:body_start + file_size]
        offset = (body_start + file_size + 3) & ~3
        if name == "TRAILER!!!":
            assert offset == len(data)
            return entries
        entries.append((name, fields[1], body, (fields[9], fields[10])))


def test_cpio_writer_round_trips():
    archive = build.Cpio()
    archive.directory("bin")
    archive.file("bin/busybox", b"\x7fELF" + b"x" * 13, 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.char_device("dev/console", 5, 1)
    archive.file("empty", b"")
    entries = read_newc(archive.finish())
    assert entries == [
        ("bin", 0o040755, b"", (0, 0)),
        ("bin/busybox", 0o100755, b"\x7fELF" + b"x" * 13, (0, 0)),
        ("bin/sh", 0o120777, b"busybox", (0, 0)),
        ("dev/console", 0o020600, b"", (5, 1)),
        ("empty", 0o100644, b"", (0, 0)),
    ]


def test_initramfs_has_init_agent_and_modules_in_order(tmp_path):
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"BB")
    init = tmp_path / "init.sh"
    init.write_bytes(b"#!/bin/busybox sh\n")
    agent_file = tmp_path / "agent.py"
    agent_file.write_bytes(b"pass\n")
    image = build.build_initramfs(str(busybox), str(init), [str(agent_file)],
                                  [("kvm", b"K"), ("kvm_amd", b"A")])
    entries = {name: (mode, body) for name, mode, body, _ in read_newc(image)}
    assert entries["init"] == (0o100755, b"#!/bin/busybox sh\n")
    assert entries["testbed/pyvmm_testbed/agent.py"][1] == b"pass\n"
    assert entries["lib/modules/kvm_amd.ko"][1] == b"A"
    assert entries["etc/testbed-modules"][1] == b"kvm\nkvm_amd\n"


def test_initramfs_key_changes_with_every_input(tmp_path):
    script = tmp_path / "init.sh"
    script.write_text("one")
    base = build.initramfs_key("6.12.1-1", "1:1.35", ["kvm"], [str(script)])
    assert base == build.initramfs_key("6.12.1-1", "1:1.35", ["kvm"], [str(script)])
    assert base != build.initramfs_key("6.12.2-1", "1:1.35", ["kvm"], [str(script)])
    assert base != build.initramfs_key("6.12.1-1", "1:1.36", ["kvm"], [str(script)])
    assert base != build.initramfs_key("6.12.1-1", "1:1.35", ["kvm", "tun"], [str(script)])
    script.write_text("two")
    assert base != build.initramfs_key("6.12.1-1", "1:1.35", ["kvm"], [str(script)])


# -- provisioning -----------------------------------------------------------------

def test_cache_directory_precedence():
    assert provision.cache_directory({"PYVMM_CACHE": "/c", "XDG_CACHE_HOME": "/x"}) == "/c/testbed"
    assert provision.cache_directory({"XDG_CACHE_HOME": "/x", "HOME": "/h"}) == "/x/pyvmm/testbed"
    assert provision.cache_directory({"HOME": "/h"}) == "/h/.cache/pyvmm/testbed"


def test_debian_mirror_from_deb822_and_one_line_sources():
    deb822 = ("Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
              "Components: main\n\nTypes: deb\n# a comment\nURIs: http://mirror.example/debian/\n"
              "Suites: bookworm bookworm-updates\nComponents: main\n")
    assert provision.debian_mirror([deb822]) == "http://mirror.example/debian"
    disabled = "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n"
    assert provision.debian_mirror([disabled]) == provision.DEFAULT_MIRROR
    one_line = ("# deb http://commented.example/debian bookworm main\n"
                "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main\n")
    assert provision.debian_mirror([one_line]) == "http://one.example/debian"
    assert provision.debian_mirror([]) == provision.DEFAULT_MIRROR


def test_package_metadata_parsing():
    assert provision.parse_qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2)") == (10, 0)
    assert provision.parse_qemu_version("QEMU emulator version 7.2.19") == (7, 2)
    assert provision.parse_qemu_version("nonsense") is None
    assert provision.parse_depends("linux-image-6.12.1+deb13-amd64 (= 6.12.1-1), a | b, c:any") == [
        "linux-image-6.12.1+deb13-amd64", "a", "c"]
    fields = provision.control_fields("Package: x\nVersion: 1:2-3\nDescription: d\n more\n\nPackage: y\n")
    assert fields == {"Package": "x", "Version": "1:2-3", "Description": "d"}
    assert provision.deb_filename_prefix("busybox-static", "1:1.35.0-4") == "busybox-static_1%3a1.35.0-4_"


def test_the_l1_kernel_comes_from_the_option_then_the_environment():
    assert provision.kernel_suite(None, {}) == provision.DEFAULT_KERNEL_SUITE == "trixie"
    assert provision.kernel_suite(None, {provision.KERNEL_ENVIRONMENT: "trixie-backports"}) == "trixie-backports"
    assert provision.kernel_suite("trixie", {provision.KERNEL_ENVIRONMENT: "trixie-backports"}) == "trixie"
    with pytest.raises(provision.ProvisionError, match="PYVMM_TESTBED_L1_KERNEL=sid"):
        provision.kernel_suite(None, {provision.KERNEL_ENVIRONMENT: "sid"})
    # trixie keeps the state file it had before the choice existed.
    assert provision.state_filename("trixie") == "state.json"
    assert provision.state_filename("trixie-backports") == "state-trixie-backports.json"


def test_split_kernel_packages_are_found_from_the_images_depends():
    image = "linux-image-7.3.4+deb13-amd64"
    depends = provision.parse_depends(
        "dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, linux-base-7.3.4+deb13-amd64 "
        "(= 7.3.4-1~bpo13+1), linux-binary-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), "
        "linux-modules-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1)")
    assert provision.kernel_packages(image, depends) == [
        image, "linux-base-7.3.4+deb13-amd64", "linux-binary-7.3.4+deb13-amd64", "linux-modules-7.3.4+deb13-amd64"]
    # 6.12's image is whole: its Depends name no package of its release.
    assert provision.kernel_packages("linux-image-6.12.1+deb13-amd64", ["kmod", "linux-base", "initramfs-tools"]) == [
        "linux-image-6.12.1+deb13-amd64"]
    assert provision.vmlinuz_candidates("/t", "/t/usr/lib/modules", "7.3.4") == [
        "/t/boot/vmlinuz-7.3.4", "/t/usr/lib/modules/7.3.4/vmlinuz"]


def test_kernel_config_check_names_every_gap():
    good = "CONFIG_KVM_XEN=y\nCONFIG_KVM_AMD=m\nCONFIG_NET_9P_VIRTIO=m\nCONFIG_9P_FS=y\n"
    assert provision.config_problems(good) == []
    bad = "# CONFIG_KVM_XEN is not set\nCONFIG_KVM_AMD=m\nCONFIG_NET_9P_VIRTIO=m\nCONFIG_9P_FS=n\n"
    assert provision.config_problems(bad) == ["CONFIG_KVM_XEN=y (it has not set)", "CONFIG_9P_FS=y|m (it has n)"]


def write_state(cache, suite, version):
    kernel = cache / ("kernel-" + version)
    (kernel / "boot").mkdir(parents=True)
    (kernel / "boot" / "vmlinuz").write_text("")
    (kernel / "modules").mkdir()
    deb = cache / "debs" / ("linux-image-%s.deb" % version)
    deb.write_text("")
    state = {"kernel": {"version": version, "vmlinuz": str(kernel / "boot" / "vmlinuz"),
                        "modules": str(kernel / "modules"), "deb": str(deb), "debs": [str(deb)]},
             "busybox": {"version": "1:1.35", "path": str(cache / "busybox-1_1.35" / "busybox"),
                         "deb": str(cache / "debs" / "busybox.deb")}}
    (cache / provision.state_filename(suite)).write_text(json.dumps(state))


def test_both_kernels_stay_cached_and_only_unused_ones_go(tmp_path):
    (tmp_path / "debs").mkdir()
    (tmp_path / "busybox-1_1.35").mkdir()
    (tmp_path / "busybox-1_1.35" / "busybox").write_text("")
    write_state(tmp_path, "trixie", "6.12.2-1")
    write_state(tmp_path, "trixie-backports", "7.3.4-1~bpo13+1")
    (tmp_path / "kernel-6.12.1-1").mkdir()
    (tmp_path / "debs" / "linux-image-6.12.1-1.deb").write_text("")
    provision.Provisioner(str(tmp_path), print, "trixie-backports")._remove_stale()
    assert sorted(os.listdir(tmp_path / "debs")) == ["linux-image-6.12.2-1.deb", "linux-image-7.3.4-1~bpo13+1.deb"]
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("kernel-")) == [
        "kernel-6.12.2-1", "kernel-7.3.4-1~bpo13+1"]


# -- host side ----------------------------------------------------------------------

def test_git_toplevel_and_writable_paths(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "sub" / "deeper").mkdir(parents=True)
    other = tmp_path / "other"
    other.mkdir()
    assert host.git_toplevel(str(repo / "sub" / "deeper")) == str(repo)
    assert host.git_toplevel(str(other)) is None
    assert host.writable_paths(str(repo / "sub"), [str(other), str(repo)]) == [
        os.path.realpath(repo), os.path.realpath(other)]
    assert host.writable_paths(str(other), []) == [os.path.realpath(other)]
    assert host.writable_paths("/", []) == []


def test_job_environment_drops_session_variables():
    env = host.job_environment({"PATH": "/bin", "DISPLAY": ":0", "SSH_AUTH_SOCK": "/run/x",
                                "XDG_RUNTIME_DIR": "/run/user/0", "TERM": "xterm",
                                "TMPDIR": "/tmp"}, ["/work"])
    assert env == {"PATH": "/bin", "TERM": "xterm", "TMPDIR": "/tmp"}
    assert "TMPDIR" not in host.job_environment({"TMPDIR": "/var/tmp/me"}, ["/work"])
    assert host.job_environment({"TMPDIR": "/work/tmp"}, ["/work"]) == {"TMPDIR": "/work/tmp"}
    assert "TMPDIR" not in host.job_environment({"TMPDIR": "/workshop"}, ["/work"])


def test_terminal_plan_follows_stdin():
    assert host.terminal_plan(False, True, True) == {"stdin": False, "stdout": False, "stderr": False}
    assert host.terminal_plan(True, True, False) == {"stdin": True, "stdout": True, "stderr": False}


def test_qemu_command_escapes_and_exports():
    command = host.qemu_command("qemu", "vmlinuz", "initrd", 1024, 2, "/usr/bin/python3", 5, 6,
                                ["/work/a,b", "/data"])
    assert "local,id=rw0,path=/work/a,,b,security_model=none" in command
    assert "virtio-9p-pci,fsdev=rw1,mount_tag=rw1" in command
    assert command[command.index("-m") + 1] == "1024"
    assert "socket,id=agent,fd=6" in command
    assert command[command.index("-append") + 1].endswith("pyvmm.python=/usr/bin/python3")
    assert "nokaslr" in command[command.index("-append") + 1].split()  # kallsyms' addresses hold
    assert "-mon" not in command
    assert command[command.index("-accel") + 1] == "tcg,thread=multi"
    single = host.qemu_command("qemu", "vmlinuz", "initrd", 1024, 2, "/usr/bin/python3", 5, 6, [], tcg_threads="single")
    assert single[single.index("-accel") + 1] == "tcg,thread=single"
    assert not any(word.startswith("idle=") for word in command[command.index("-append") + 1].split())  # halt
    polling = host.qemu_command("qemu", "vmlinuz", "initrd", 1024, 2, "/usr/bin/python3", 5, 6, [], idle="poll")
    assert "idle=poll" in polling[polling.index("-append") + 1].split()
    assert not any(word.startswith("transparent_hugepage") for word in command[command.index("-append") + 1].split())
    no_thp = host.qemu_command("qemu", "vmlinuz", "initrd", 1024, 2, "/usr/bin/python3", 5, 6, [], thp="never")
    assert "transparent_hugepage=never" in no_thp[no_thp.index("-append") + 1].split()
    with_monitor = host.qemu_command("qemu", "vmlinuz", "initrd", 1024, 2, "/usr/bin/python3", 5, 6, [],
                                     monitor_fd=9)
    assert "socket,id=monitor,fd=9" in with_monitor and "chardev=monitor,mode=readline" in with_monitor
    with pytest.raises(host.TestbedError):
        host.kernel_command_line("/opt/my python/bin/python3")


def test_xen_capability_decoding():
    assert host.xen_flag_names(0x1ff)[-1] == "SHARED_INFO_HVA"
    assert host.xen_flag_names(0b110) == ["INTERCEPT_HCALL", "SHARED_INFO"]
    assert host.xen_flag_names(1 << 12) == ["unknown 0x1000"]
    assert host.xen_usable(0b110)
    assert not host.xen_usable(0b010)
    assert not host.xen_usable(0)


def test_console_helpers():
    log = b"[ 1.0] boot\r\nPYVMM-TESTBED-FATAL: /dev/kvm is missing\r\n[ 2.0] reboot: Power down\r\n"
    assert host.fatal_reason(log) == "/dev/kvm is missing"
    assert host.fatal_reason(b"all fine\n") is None
    assert host.console_tail(log, 2) == ["PYVMM-TESTBED-FATAL: /dev/kvm is missing",
                                         "[ 2.0] reboot: Power down"]


REGISTERS = """info registers -a

CPU#0
RAX=0000000000000000 RBX=ffffffff82a0c940 RCX=0000000000000001 RDX=0000000000000000
RIP=ffffffff81e4a5ff RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1

CPU#1
RAX=0000000000000001 RBX=0000000000000000 RCX=0000000000000000 RDX=0000000000000000
RIP=0000564a3c2b1000 RFL=00000202 [-------] CPL=3 II=0 A20=1 SMM=0 HLT=0
(qemu) """
KALLSYMS = ("ffffffff81000000 T _stext\nffffffff81e4a5f0 T default_idle\n"
            "ffffffff81e4a610 t default_idle_call\nffffffff82a0c940 D init_task\n"
            "ffffffffc0a01000 t svm_vcpu_run\t[kvm_amd]\n")


def test_a_frozen_l1s_cpus_are_named_from_the_monitor_and_kallsyms(tmp_path):
    (tmp_path / "kallsyms").write_text(KALLSYMS)
    symbols = host.read_symbols(tmp_path / "kallsyms")
    assert [name for _, name in symbols] == ["_stext", "default_idle", "default_idle_call",
                                             "svm_vcpu_run [kvm_amd]"]  # code only
    assert host.symbolize(0xffffffffc0a01010, symbols) == "svm_vcpu_run [kvm_amd]+0x10"
    assert host.symbolize(0xffffffff81e4a5ff, symbols) == "default_idle+0xf"
    assert host.symbolize(0x1000, symbols) is None
    assert host.read_symbols(tmp_path / "missing") == []
    assert host.cpu_summary(REGISTERS, symbols) == [
        "vCPU 0 at 0xffffffff81e4a5ff (default_idle+0xf), CPL 0, halted",
        "vCPU 1 at 0x564a3c2b1000, CPL 3"]


class FakeArtifacts:
    def __init__(self, directory):
        self.vmlinuz = str(directory / "vmlinuz-6.12")
        self.kernel = {"release": "6.12"}


def silent_run(tmp_path, monitor_answer):
    """A Run whose command started 200 s ago and whose agent said nothing
    since, with QEMU's monitor played by a thread on a socketpair; the
    returned `done()` ends that thread and closes both ends."""
    (tmp_path / "kallsyms-6.12").write_text(KALLSYMS)
    run = host.Run(FakeArtifacts(tmp_path), {}, 1024, 2, [], None, 60, print, False, silence=180)
    run.monitor, qemu_end = socket.socketpair()
    run.started_at = run.last_word = time.monotonic() - 200

    def monitor():
        if qemu_end.recv(100) == b"info registers -a\n" and monitor_answer:
            qemu_end.sendall(monitor_answer.encode())
    thread = threading.Thread(target=monitor, daemon=True)
    thread.start()

    def done():
        # The run's end first: the thread's recv() then sees the end of the
        # stream. Closing the thread's own end under it fails that recv()
        # (EBADF), an exception pytest reports against a later test.
        run.monitor.close()
        thread.join(5)
        assert not thread.is_alive()
        qemu_end.close()
    return run, done


def test_an_agent_silent_past_the_limit_is_a_frozen_l1_with_its_cpus_named(tmp_path):
    run, done = silent_run(tmp_path, REGISTERS)
    assert run._next_deadline() == 0.0
    with pytest.raises(host.TestbedError) as error:
        run._check_deadlines()
    message = str(error.value)
    assert message.startswith("L1 stopped responding: no word from its agent for 200 s")
    assert "vCPU 0 at 0xffffffff81e4a5ff (default_idle+0xf), CPL 0, halted" in message
    assert b"RIP=0000564a3c2b1000" in run.monitor_log  # the whole answer is kept after the console
    done()


def test_a_monitor_that_does_not_answer_is_said_so(tmp_path, monkeypatch):
    monkeypatch.setattr(host, "MONITOR_WAIT", 0.5)
    run, done = silent_run(tmp_path, "")
    with pytest.raises(host.TestbedError, match="monitor did not answer"):
        run._check_deadlines()
    done()


def test_an_agent_that_speaks_or_a_finished_command_is_never_silent(tmp_path):
    run, done = silent_run(tmp_path, REGISTERS)
    run._handle_frame(wire.ALIVE, b"0.50 0.40 0.30 1/90 123")
    assert run.l1_load == b"0.50 0.40 0.30 1/90 123"
    assert 179 < run._next_deadline() <= 180
    run._check_deadlines()
    run.last_word -= 1000
    run.exit_status = 0
    run._check_deadlines()  # the command is over: nothing more to hear
    run.exit_status, run.silence = None, 0
    run._check_deadlines()  # --l1-silence 0: never
    run.silence, run.last_word = 180, time.monotonic() - 1000
    run._output(1).pending += b"x" * host.OUTPUT_BACKLOG_LIMIT  # we are not reading the agent now
    run._check_deadlines()
    assert time.monotonic() - run.last_word < 5  # its silence counts from when we read again
    done()


def test_a_task_l1_reports_blocked_for_minutes_is_a_stuck_l1_with_the_stacks_kept(tmp_path):
    run = host.Run(FakeArtifacts(tmp_path), {}, 1024, 2, [], None, 60, print, False)
    run.started_at = run.last_word = time.monotonic()
    # The console as CI's stuck L1 printed it, cut in the middle of its lines.
    run._watch_hung_tasks(b"[  39.0] kvm: kvm [190]: vcpu0, Unhandled WRMSR(0xc0010007) = 0xffff\r\n[ 243.3] INFO: task khu")
    assert not run.to_agent
    run._watch_hung_tasks(b"gepaged:41 blocked for more than 120 seconds.\r\n[ 243.4]       Not tainted\r\n")
    assert wire.Decoder().feed(bytes(run.to_agent)) == [(wire.SHOW_STACKS, b"")]
    assert run.stuck is None
    run._check_deadlines()
    run.to_agent.clear()
    run._watch_hung_tasks(b"[ 363.5] INFO: task khugepaged:41 blocked for more than 241 seconds.\r\n")
    assert wire.Decoder().feed(bytes(run.to_agent)) == [(wire.SHOW_STACKS, b"")]  # again: did they move?
    reason, give_up_at = run.stuck
    assert "L1 is stuck: its kernel reports task khugepaged:41 blocked for more than 241 s" in reason
    assert 0 < run._next_deadline() <= host.STACKS_WAIT  # the stacks have this long to reach the console
    run._check_deadlines()
    run.stuck = (reason, time.monotonic() - 1)
    with pytest.raises(host.TestbedError, match="L1 is stuck: .* khugepaged:41"):
        run._check_deadlines()


def test_the_agent_puts_the_stacks_on_the_console_at_a_level_it_prints(tmp_path, capsys):
    printk, sysrq = tmp_path / "printk", tmp_path / "sysrq-trigger"
    agent.show_stacks(((printk, "8"), (sysrq, "w"), (tmp_path / "no" / "such", "l")))
    assert printk.read_text() == "8" and sysrq.read_text() == "w"
    assert "cannot write l to" in capsys.readouterr().err  # said on L1's console, and no exception
    assert [path for path, _ in agent.SHOW_STACKS_WRITES] == [
        "/proc/sys/kernel/printk", "/proc/sysrq-trigger", "/proc/sysrq-trigger"]
    assert [key for _, key in agent.SHOW_STACKS_WRITES] == ["8", "w", "l"]


# -- command line ---------------------------------------------------------------------

def test_arguments(tmp_path):
    options = cli.parse_arguments(["--memory", "2048", "--rw", str(tmp_path), "--modules",
                                   "vhost_net,dummy", "--", "python3", "--version"])
    assert options.command == ["python3", "--version"]
    assert options.memory == 2048 and options.cpus == 2
    assert options.modules == ["vhost_net", "dummy"]
    assert cli.parse_arguments(["--check"]).check
    assert cli.parse_arguments(["--check"], environ={}).l1_kernel == "trixie"
    backports = ["--l1-kernel", "trixie-backports", "--check"]
    assert cli.parse_arguments(backports, environ={}).l1_kernel == "trixie-backports"
    assert cli.parse_arguments(["--check"], environ={"PYVMM_TESTBED_L1_KERNEL": "trixie-backports"}).l1_kernel == (
        "trixie-backports")
    assert cli.parse_arguments(["--check"], environ={}).l1_silence == host.DEFAULT_L1_SILENCE
    assert cli.parse_arguments(["--check"], environ={"PYVMM_TESTBED_L1_SILENCE": "0"}).l1_silence == 0
    assert cli.parse_arguments(["--l1-silence", "300", "--check"], environ={}).l1_silence == 300
    assert cli.parse_arguments(["--check"], environ={}).tcg_threads == "multi"
    environ = {"PYVMM_TESTBED_TCG_THREADS": "single", "PYVMM_TESTBED_CPUS": "1"}
    assert (cli.parse_arguments(["--check"], environ=environ).tcg_threads, cli.parse_arguments(
        ["--check"], environ=environ).cpus) == ("single", 1)
    assert cli.parse_arguments(["--tcg-threads", "multi", "--cpus", "2", "--check"], environ=environ).cpus == 2
    assert cli.parse_arguments(["--check"], environ={}).l1_idle == "halt"
    assert cli.parse_arguments(["--check"], environ={}).l1_thp == "always"
    assert cli.parse_arguments(["--check"], environ={"PYVMM_TESTBED_L1_THP": "never"}).l1_thp == "never"
    assert cli.parse_arguments(["--l1-thp", "always", "--check"], environ={"PYVMM_TESTBED_L1_THP": "never"}).l1_thp == (
        "always")
    assert cli.parse_arguments(["--check"], environ={"PYVMM_TESTBED_L1_IDLE": "poll"}).l1_idle == "poll"
    assert cli.parse_arguments(["--l1-idle", "halt", "--check"], environ={"PYVMM_TESTBED_L1_IDLE": "poll"}).l1_idle == (
        "halt")


@pytest.mark.parametrize("argv", [[], ["--check", "--", "true"], ["--prepare", "--check"],
                                  ["--rw", "/no/such/dir", "--", "true"], ["--cpus", "0", "--", "true"],
                                  ["--timeout", "-1", "--", "true"], ["--l1-kernel", "sid", "--check"],
                                  ["--l1-silence", "5", "--check"], ["--l1-silence", "-1", "--check"],
                                  ["--tcg-threads", "many", "--check"], ["--l1-idle", "mwait", "--check"]])
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_arguments(argv)
    assert exit_info.value.code == 2


@pytest.mark.parametrize("environ", [{"PYVMM_TESTBED_CPUS": "two"}, {"PYVMM_TESTBED_TCG_THREADS": "many"},
                                     {"PYVMM_TESTBED_L1_SILENCE": "long"}, {"PYVMM_TESTBED_L1_SILENCE": "5"},
                                     {"PYVMM_TESTBED_L1_IDLE": "mwait"}])
def test_bad_environment_defaults_are_usage_errors(environ, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_arguments(["--check"], environ=environ)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert next(iter(environ)) in err or "--l1-silence must be 0 (never) or at least 30 s" in err


# -- the agent's relay, run on the host with a socketpair as the channel ----------------

def run_agent_job(argv, stdin=b"", env=None):
    ours, theirs = socket.socketpair()
    job = {"argv": argv, "env": env or {"PATH": os.environ["PATH"]}, "cwd": "/",
           "tty": host.terminal_plan(False, False, False)}
    channel = agent.Channel(theirs.fileno())
    command = agent.Command(job)
    result = {}
    thread = threading.Thread(target=lambda: result.update(status=agent.serve(channel, command)))
    thread.start()
    ours.sendall(wire.encode(wire.STDIN, stdin) + wire.encode(wire.STDIN_EOF))
    thread.join(timeout=30)
    # A command that never reads its stdin leaves our frames unread on the
    # agent's side, and closing a unix socket with unread data resets the
    # connection (ECONNRESET on our reads) instead of ending it: drain first.
    theirs.setblocking(False)
    try:
        while theirs.recv(65536):
            pass
    except BlockingIOError:
        pass
    theirs.close()
    decoder = wire.Decoder()
    frames = []
    while True:
        data = ours.recv(65536)
        if not data:
            break
        frames += decoder.feed(data)
    ours.close()
    return result["status"], frames


def joined(frames, kind):
    return b"".join(payload for frame_kind, payload in frames if frame_kind == kind)


def test_agent_relays_streams_separately_and_reports_status():
    status, frames = run_agent_job(["sh", "-c", "cat; echo err >&2; exit 7"], stdin=b"in\n")
    assert status == 7
    assert joined(frames, wire.STDOUT) == b"in\n"
    assert joined(frames, wire.STDERR) == b"err\n"
    assert sum(wire.U32.unpack(p)[0] for k, p in frames if k == wire.STDIN_ACK) == 3


def test_the_agent_says_it_is_alive_from_the_start(monkeypatch):
    monkeypatch.setattr(agent, "ALIVE_SECONDS", 0.2)
    _, frames = run_agent_job(["sleep", "0.7"])
    alive = [payload for kind, payload in frames if kind == wire.ALIVE]
    assert 3 <= len(alive) <= 6
    assert len(alive[0].split()) == 5  # /proc/loadavg


def test_the_agent_sends_l1s_code_symbols_compressed():
    import zlib
    if not os.access("/proc/kallsyms", os.R_OK):
        pytest.skip("no /proc/kallsyms here")
    text = zlib.decompress(agent.text_symbols()).decode()
    lines = text.splitlines()
    assert lines and all(line.split()[1] in ("t", "T") for line in lines)


def test_a_kernels_symbols_are_asked_for_once_and_kept_beside_it(tmp_path):
    import zlib
    run = host.Run(FakeArtifacts(tmp_path), {"kind": "run"}, 1024, 2, [], None, 60, print, False)
    assert run.symbols_path() == str(tmp_path / "kallsyms-6.12")
    run._handle_frame(wire.KALLSYMS, zlib.compress(KALLSYMS.encode()))
    assert (tmp_path / "kallsyms-6.12").read_text() == KALLSYMS
    run._handle_frame(wire.KALLSYMS, b"not zlib")  # ignored, the kept copy stays
    assert (tmp_path / "kallsyms-6.12").read_text() == KALLSYMS


def test_agent_passes_the_environment_and_signal_status():
    status, frames = run_agent_job(["sh", "-c", 'printf %s "$GREETING"; kill -TERM $$'],
                                   env={"PATH": os.environ["PATH"], "GREETING": "hi there"})
    assert joined(frames, wire.STDOUT) == b"hi there"
    assert status == 128 + 15


def test_agent_reports_missing_programs_like_a_shell():
    with pytest.raises(agent.SpawnError) as error:
        agent.Command({"argv": ["/no/such/program"], "env": {}, "cwd": "/",
                       "tty": host.terminal_plan(False, False, False)})
    assert error.value.status == 127
    assert "No such file" in error.value.message()


def test_job_is_json_serializable(tmp_path):
    options = cli.parse_arguments(["--", "echo", "\udcff"])
    job = cli.build_job(options, [str(tmp_path)])
    assert json.loads(json.dumps(job))["argv"] == ["echo", "\udcff"]


def test_the_command_sees_the_settings_l1_runs_with():
    options = cli.parse_arguments(["--tcg-threads", "single", "--l1-thp", "never", "--", "true"],
                                  environ={"PYVMM_TESTBED_L1_IDLE": "poll"})
    environment = cli.build_job(options, [])["env"]
    assert (environment["PYVMM_TESTBED_TCG_THREADS"], environment["PYVMM_TESTBED_L1_IDLE"],
            environment["PYVMM_TESTBED_L1_THP"]) == ("single", "poll", "never")


def test_the_agents_kvm_numbers_are_the_kernels():
    """The agent is standard library only: its KVM ioctl numbers and struct
    layout (for the VM that holds L1's static keys) must match pyvmm's."""
    from pyvmm.kvm import uapi

    assert agent.KVM_CREATE_VM == uapi.KVM_CREATE_VM
    assert agent.KVM_CREATE_VCPU == uapi.KVM_CREATE_VCPU
    assert agent.KVM_CREATE_IRQCHIP == uapi.KVM_CREATE_IRQCHIP
    assert agent.KVM_XEN_HVM_CONFIG == uapi.KVM_XEN_HVM_CONFIG
    assert agent.XEN_HVM_CONFIG.size == uapi.ffi.sizeof("struct kvm_xen_hvm_config")


def test_holding_static_keys_gives_up_quietly_without_kvm(monkeypatch):
    def no_kvm(path, flags):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(agent.os, "open", no_kvm)
    assert agent.hold_static_keys() == []


def test_a_failed_runs_whole_console_is_kept_and_only_the_newest_are(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "KEEP_CONSOLE_LOGS", 2)
    panic = b"".join(b"[ %d.0] line %d\n" % (n, n) for n in range(200)) + b"Kernel panic - not syncing: x\n"
    paths = []
    for number in range(3):
        monkeypatch.setattr(cli.time, "strftime", lambda form, n=number: "20261206-00000%d" % n)
        paths.append(cli.keep_console(panic, str(tmp_path)))
    assert open(paths[-1], "rb").read() == panic  # whole, not the 25-line tail
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path) for path in paths[1:]]
    assert cli.keep_console(b"", str(tmp_path)) is None


def test_failing_names_the_kept_console(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYVMM_TESTBED_LOGS", str(tmp_path))
    assert cli.fail("L1 stopped", b"Kernel panic - not syncing: y\n") == cli.EXIT_TESTBED_FAILED
    (kept,) = os.listdir(tmp_path)
    assert f"the whole L1 console: {tmp_path / kept}" in capsys.readouterr().err


def test_pruning_keeps_the_current_initramfs_and_the_newest_others(tmp_path):
    paths = []
    for index in range(8):
        path = tmp_path / f"initramfs-{index}.cpio"
        path.write_bytes(b"x")
        os.utime(path, (1000 + index, 1000 + index))  # initramfs-7 is the newest
        paths.append(str(path))
    (tmp_path / "state.json").write_text("{}")
    provision.prune_initramfs(str(tmp_path), {paths[0]})
    left = sorted(name for name in os.listdir(tmp_path) if name.startswith("initramfs-"))
    newest = [f"initramfs-{index}.cpio" for index in range(7, 7 - provision.KEEP_OTHER_INITRAMFS, -1)]
    assert left == sorted(["initramfs-0.cpio", *newest])  # another checkout's build waiting to boot survives
    assert (tmp_path / "state.json").exists()
