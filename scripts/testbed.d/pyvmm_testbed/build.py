"""Building the L1 boot files: kernel modules, their dependencies, the initramfs.

Pure parts (ELF .modinfo parsing, dependency order, the cpio writer) are
separate from the parts that read the kernel package's files.
"""

import gzip
import hashlib
import lzma
import os
import stat
import struct

# Loaded at L1 boot, in this order after their dependencies.  kvm_amd needs
# ccp for SEV even where its modinfo does not say so.
DEFAULT_MODULES = (
    "irqbypass", "kvm", "ccp", "kvm_amd",
    "netfs", "9pnet", "9pnet_virtio", "9p",
    "tun", "bridge", "veth",
)

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz")


class BuildError(Exception):
    pass


def module_name(filename):
    """The kernel's name for a module file: no suffix, dashes as underscores."""
    base = os.path.basename(filename)
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[:-len(suffix)]
            break
    return base.replace("-", "_")


def decompress_module(path):
    with open(path, "rb") as module_file:
        data = module_file.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    return data


def modinfo_depends(elf):
    """The module names in the `depends=` entry of a module's .modinfo section."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise BuildError("not a 64-bit little-endian ELF file")
    section_offset, = struct.unpack_from("<Q", elf, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", elf, 0x3A)
    if entry_size < 64 or section_offset + count * entry_size > len(elf) or names_index >= count:
        raise BuildError("ELF section table out of bounds")

    def section(index):
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, section_offset + index * entry_size)
        if offset + size > len(elf):
            raise BuildError("ELF section %d out of bounds" % index)
        return name, elf[offset:offset + size]

    _, names = section(names_index)
    for index in range(count):
        name_offset, body = section(index)
        if names[name_offset:names.find(b"\0", name_offset)] == b".modinfo":
            for entry in body.split(b"\0"):
                if entry.startswith(b"depends="):
                    value = entry[len(b"depends="):].decode()
                    return [module_name(dep) for dep in value.split(",") if dep]
            return []
    raise BuildError("no .modinfo section")


def load_order(requested, depends_of):
    """Modules to load so that every one comes after what it depends on.

    requested: names in the order wanted; depends_of(name) -> list of names.
    """
    order, done, visiting = [], set(), []

    def visit(name):
        if name in done:
            return
        if name in visiting:
            cycle = " -> ".join(visiting[visiting.index(name):] + [name])
            raise BuildError("module dependency cycle: " + cycle)
        visiting.append(name)
        for dependency in depends_of(name):
            visit(dependency)
        visiting.pop()
        done.add(name)
        order.append(name)

    for name in requested:
        visit(module_name(name))
    return order


class ModuleTree:
    """The modules of one kernel as shipped in its package (/usr/lib/modules/<release>)."""

    def __init__(self, root):
        self.root = root
        self.paths = {}
        for directory, _, files in os.walk(os.path.join(root, "kernel")):
            for filename in files:
                if filename.endswith(MODULE_SUFFIXES):
                    self.paths[module_name(filename)] = os.path.join(directory, filename)
        self.builtin = set()
        try:
            with open(os.path.join(root, "modules.builtin")) as builtin:
                self.builtin = {module_name(line.strip()) for line in builtin if line.strip()}
        except FileNotFoundError:
            pass
        self._depends = {}

    def depends_of(self, name):
        if name in self.builtin:
            return []
        if name not in self._depends:
            self._depends[name] = modinfo_depends(self.load(name))
        return self._depends[name]

    def load(self, name):
        try:
            path = self.paths[name]
        except KeyError:
            raise BuildError("kernel module %r does not exist in %s" % (name, self.root)) from None
        return decompress_module(path)

    def missing(self, names):
        """Those of `names` this kernel neither packages nor builds in."""
        return [module_name(name) for name in names
                if module_name(name) not in self.paths and module_name(name) not in self.builtin]

    def resolve(self, names):
        """Loadable modules for `names` with their dependencies, in load order; built-ins left out."""
        missing = self.missing(names)
        if missing:
            # All at once: a kernel that renamed or dropped modules shows every gap in one run.
            raise BuildError("kernel %s has no module %s (neither packaged nor built in)"
                             % (os.path.basename(self.root.rstrip("/")), ", ".join(missing)))
        return [name for name in load_order(names, self.depends_of) if name not in self.builtin]

    def materialize(self, names, directory):
        """Writes decompressed copies of `names` as directory/<name>.ko; returns their paths."""
        os.makedirs(directory, exist_ok=True)
        paths = []
        for name in names:
            path = os.path.join(directory, name + ".ko")
            if not os.path.exists(path):
                write_atomically(path, self.load(name))
            paths.append(path)
        return paths


def write_atomically(path, data, mode=0o644):
    temporary = "%s.tmp%d" % (path, os.getpid())
    with open(temporary, "wb") as output:
        output.write(data)
    os.chmod(temporary, mode)
    os.replace(temporary, path)


class Cpio:
    """Writes an uncompressed "newc" cpio archive, the format the kernel unpacks as initramfs."""

    MAGIC = b"070701"

    def __init__(self):
        self._parts = []
        self._inode = 0

    def _entry(self, name, mode, data=b"", rdev=(0, 0)):
        name = name.lstrip("/").encode() + b"\0"
        self._inode += 1
        fields = (self._inode, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(name), 0)
        header = self.MAGIC + b"".join(b"%08X" % field for field in fields)
        self._parts += [header, name, _padding(len(header) + len(name)),
                        data, _padding(len(data))]

    def directory(self, name, permissions=0o755):
        self._entry(name, stat.S_IFDIR | permissions)

    def file(self, name, data, permissions=0o644):
        self._entry(name, stat.S_IFREG | permissions, data)

    def symlink(self, name, target):
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name, major, minor, permissions=0o600):
        self._entry(name, stat.S_IFCHR | permissions, rdev=(major, minor))

    def finish(self):
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def _padding(length):
    return b"\0" * (-length % 4)


def initramfs_key(kernel_version, busybox_version, module_names, source_files):
    """Identifies an initramfs by everything that goes into it."""
    digest = hashlib.sha256()
    digest.update(b"testbed-initramfs-v1\0")
    for text in (kernel_version, busybox_version, ",".join(module_names)):
        digest.update(text.encode() + b"\0")
    for path in sorted(source_files):
        with open(path, "rb") as source:
            digest.update(os.path.basename(path).encode() + b"\0" + source.read() + b"\0")
    return digest.hexdigest()[:16]


def build_initramfs(busybox, init_script, agent_files, modules):
    """The L1 initramfs: busybox, /init, the agent package, the boot modules.

    modules: (name, decompressed bytes) in load order.
    """
    archive = Cpio()
    for directory in ("bin", "dev", "proc", "sys", "host", "tmp", "etc", "lib",
                      "lib/modules", "testbed", "testbed/pyvmm_testbed"):
        archive.directory(directory)
    archive.char_device("dev/console", 5, 1)
    with open(busybox, "rb") as binary:
        archive.file("bin/busybox", binary.read(), 0o755)
    with open(init_script, "rb") as script:
        archive.file("init", script.read(), 0o755)
    for path in agent_files:
        with open(path, "rb") as source:
            archive.file("testbed/pyvmm_testbed/" + os.path.basename(path), source.read())
    for name, data in modules:
        archive.file("lib/modules/%s.ko" % name, data)
    archive.file("etc/testbed-modules", "".join(name + "\n" for name, _ in modules).encode())
    return archive.finish()
