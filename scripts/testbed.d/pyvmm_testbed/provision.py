"""Getting what the testbed needs from Debian's archive, and caching it.

- QEMU 10 (qemu-system-x86) from bookworm-backports, installed system-wide.
- The L1 kernel (linux-image-amd64 -> linux-image-<release>) of trixie or of
  trixie-backports, downloaded with a private apt configuration: the system's
  apt sources stay untouched. Each choice has its own state, so both stay cached.
- busybox-static, downloaded (not installed) from the system's own sources.
The kernel's modules and the initramfs are built from these into the cache.
"""

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys

from pyvmm_testbed import build

HERE = os.path.dirname(os.path.abspath(__file__))
INIT_SCRIPT = os.path.join(os.path.dirname(HERE), "init.sh")
AGENT_FILES = [os.path.join(HERE, name) for name in ("__init__.py", "wire.py", "agent.py")]

DEFAULT_MIRROR = "http://deb.debian.org/debian"
ARCHIVE_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# The L1 kernels: each is the newest linux-image-amd64 of a Debian suite.
KERNEL_SUITES = ("trixie", "trixie-backports")
DEFAULT_KERNEL_SUITE = "trixie"
KERNEL_ENVIRONMENT = "PYVMM_TESTBED_L1_KERNEL"
KERNEL_METAPACKAGE = "linux-image-amd64"
QEMU_MINIMUM = (10, 0)
APT_LOCK_TIMEOUT = ["-o", "DPkg::Lock::Timeout=600"]


class ProvisionError(Exception):
    pass


def cache_directory(environ):
    """${PYVMM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pyvmm}/testbed"""
    base = environ.get("PYVMM_CACHE")
    if not base:
        xdg = environ.get("XDG_CACHE_HOME") or os.path.join(environ.get("HOME") or "/root", ".cache")
        base = os.path.join(xdg, "pyvmm")
    return os.path.join(os.path.abspath(base), "testbed")


def kernel_suite(option, environ):
    """The L1 kernel's suite: the option, else the environment, else the default."""
    choice = option or environ.get(KERNEL_ENVIRONMENT) or DEFAULT_KERNEL_SUITE
    if choice not in KERNEL_SUITES:
        source = "--l1-kernel" if option else KERNEL_ENVIRONMENT
        raise ProvisionError("%s=%s: the L1 kernel is one of %s" % (source, choice, ", ".join(KERNEL_SUITES)))
    return choice


def state_filename(suite):
    # trixie's keeps the name it had before there was a choice, so existing caches stay valid.
    return "state.json" if suite == "trixie" else "state-%s.json" % suite


def cache_entries_in_use(states):
    """Names of the cache entries (in the cache and in debs/) the states use."""
    keep = set()
    for state in states:
        kernel, busybox = state["kernel"], state["busybox"]
        keep |= {os.path.basename(deb) for deb in kernel.get("debs", [kernel["deb"]])}
        keep |= {os.path.basename(busybox["deb"]),
                 "kernel-" + kernel["version"], "modules-" + kernel["version"],
                 "busybox-" + busybox["version"].replace(":", "_")}
    return keep


def debian_mirror(source_texts, suite="bookworm"):
    """The archive URI the system's apt sources use for `suite`, in either file format."""
    for text in source_texts:
        # deb822 stanzas
        for stanza in re.split(r"\n\s*\n", text):
            fields = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.split()
            if ("deb" in fields.get("types", []) and suite in fields.get("suites", [])
                    and fields.get("enabled", ["yes"])[0].lower() != "no" and fields.get("uris")):
                return fields["uris"][0].rstrip("/")
        # one-line format: deb [options] uri suite components...
        for line in text.splitlines():
            words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                return words[1].rstrip("/")
    return DEFAULT_MIRROR


def system_source_texts():
    paths = ["/etc/apt/sources.list"]
    parts = "/etc/apt/sources.list.d"
    if os.path.isdir(parts):
        paths += [os.path.join(parts, name) for name in sorted(os.listdir(parts))
                  if name.endswith((".list", ".sources"))]
    texts = []
    for path in paths:
        try:
            with open(path) as source:
                texts.append(source.read())
        except OSError:
            pass
    return texts


def parse_qemu_version(text):
    match = re.search(r"version (\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def parse_depends(text):
    """Package names in a Depends: field (alternatives and versions dropped)."""
    names = []
    for item in text.split(","):
        first = item.split("|")[0].strip()
        if first:
            names.append(first.split()[0].split(":")[0])
    return names


def kernel_packages(image, depends):
    """The packages that make up kernel `image`: itself and, where Debian splits
    a kernel (7.x: linux-binary-*, linux-modules-*, linux-base-*), the packages
    of the same release it depends on."""
    release = image[len("linux-image-"):]
    return [image] + [name for name in depends
                      if name != image and name.startswith("linux-") and name.endswith("-" + release)]


def vmlinuz_candidates(tree, modules_base, release):
    """Where an unpacked kernel package keeps its image: /boot up to 6.12, next
    to the modules (/usr/lib/modules/<release>/vmlinuz) in the split 7.x packages."""
    return [os.path.join(tree, "boot", "vmlinuz-" + release),
            os.path.join(modules_base, release, "vmlinuz")]


def config_candidates(tree, modules_base, release):
    return [os.path.join(tree, "boot", "config-" + release),
            os.path.join(modules_base, release, "config")]


# What L1 needs of its kernel's configuration: KVM's Xen support built in, and
# kvm_amd and 9p (the host's root) built in or as modules.
REQUIRED_CONFIG = {"CONFIG_KVM_XEN": ("y",), "CONFIG_KVM_AMD": ("y", "m"),
                   "CONFIG_NET_9P_VIRTIO": ("y", "m"), "CONFIG_9P_FS": ("y", "m")}


def config_problems(text):
    """What a kernel .config lacks of REQUIRED_CONFIG, one "NAME=value" per gap."""
    values = {}
    for line in text.splitlines():
        name, equals, value = line.partition("=")
        if equals and name.startswith("CONFIG_"):
            values[name] = value
    return ["%s=%s (it has %s)" % (name, "|".join(wanted), values.get(name, "not set"))
            for name, wanted in REQUIRED_CONFIG.items() if values.get(name) not in wanted]


def deb_filename_prefix(package, version):
    """How apt-get download names a package's file (an epoch's colon is %-encoded)."""
    return "%s_%s_" % (package, version.replace(":", "%3a"))


def control_fields(text):
    """Fields of the first stanza of apt-cache/dpkg control output."""
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0].isspace() or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


@contextlib.contextmanager
def locked(path):
    """Serializes concurrent first runs: one builds, the others wait and reuse."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


KEEP_OTHER_INITRAMFS = 4  # besides the kernels' current ones


def prune_initramfs(cache, keep):
    """Deletes the L1 initramfs files in `cache` other than `keep` and the
    newest KEEP_OTHER_INITRAMFS others."""
    others = [os.path.join(cache, name) for name in os.listdir(cache) if name.startswith("initramfs-")]
    others = sorted((path for path in others if path not in keep), key=os.path.getmtime, reverse=True)
    for stale in others[KEEP_OTHER_INITRAMFS:]:
        os.unlink(stale)


class Provisioner:
    def __init__(self, cache, say, suite=DEFAULT_KERNEL_SUITE):
        self.cache = cache
        self.say = say          # progress messages for the user (stderr)
        self.suite = suite
        self.state_path = os.path.join(cache, state_filename(suite))
        self.apt_dir = os.path.join(cache, "apt-" + suite)

    # -- tools ------------------------------------------------------------

    def _run(self, argv, what, cwd=None, env=None):
        try:
            result = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        except FileNotFoundError:
            raise ProvisionError("%s: %s is not installed (a Debian host is expected)"
                                 % (what, argv[0])) from None
        if result.returncode != 0:
            tail = result.stdout.decode(errors="replace").strip().splitlines()[-5:]
            raise ProvisionError("%s failed (%s exited %d): %s"
                                 % (what, argv[0], result.returncode, " / ".join(tail)))
        return result.stdout.decode(errors="replace")

    def _private_apt_options(self):
        return [
            "-o", "Dir::Etc::SourceList=" + os.path.join(self.apt_dir, "sources.list"),
            "-o", "Dir::Etc::SourceParts=" + os.path.join(self.apt_dir, "empty"),
            "-o", "Dir::Etc::Preferences=/dev/null",
            "-o", "Dir::Etc::PreferencesParts=" + os.path.join(self.apt_dir, "empty"),
            "-o", "Dir::State::Lists=" + os.path.join(self.apt_dir, "lists"),
            "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache=",
            # Downloads land in our own directories: no need for apt's sandbox user.
            "-o", "APT::Sandbox::User=root",
        ]

    # -- QEMU ---------------------------------------------------------------

    def qemu(self, install=True):
        """Path of a QEMU >= 10, installing it from bookworm-backports if allowed."""
        path = shutil.which("qemu-system-x86_64")
        version = None
        if path:
            version = parse_qemu_version(self._run([path, "--version"], "checking QEMU's version"))
        if version and version >= QEMU_MINIMUM:
            return path
        found = "QEMU %d.%d is installed" % version if version else "QEMU is not installed"
        if not install:
            raise ProvisionError("%s; the testbed needs QEMU >= %d.%d: run scripts/testbed --prepare"
                                 % ((found,) + QEMU_MINIMUM))
        if os.geteuid() != 0:
            raise ProvisionError(
                "%s; the testbed needs QEMU >= %d.%d. As root, add bookworm-backports to apt's "
                "sources and run: apt-get install -t bookworm-backports qemu-system-x86"
                % ((found,) + QEMU_MINIMUM))
        self._install_backports_qemu()
        path = shutil.which("qemu-system-x86_64")
        version = path and parse_qemu_version(self._run([path, "--version"], "checking QEMU's version"))
        if not version or version < QEMU_MINIMUM:
            raise ProvisionError("installing qemu-system-x86 from bookworm-backports did not give QEMU >= 10")
        return path

    def _install_backports_qemu(self):
        texts = system_source_texts()
        source = "/etc/apt/sources.list.d/bookworm-backports.sources"
        if not any("bookworm-backports" in line.split("#", 1)[0]
                   for text in texts for line in text.splitlines()):
            self.say("adding Debian's bookworm-backports to apt's sources (%s)" % source)
            with open(source, "w") as output:
                output.write("Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\n"
                             "Signed-By: %s\n" % (debian_mirror(texts), ARCHIVE_KEYRING))
        self.say("installing qemu-system-x86 from bookworm-backports (once; takes a minute)")
        environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        # Refresh only the backports index; the other lists stay as they are.
        self._run(["apt-get"] + APT_LOCK_TIMEOUT + [
            "-o", "Dir::Etc::SourceList=" + source, "-o", "Dir::Etc::SourceParts=-",
            "-o", "APT::Get::List-Cleanup=0", "update"], "apt-get update (bookworm-backports)",
            env=environment)
        self._run(["apt-get"] + APT_LOCK_TIMEOUT + [
            "install", "-y", "-q", "--no-install-recommends", "-t", "bookworm-backports",
            "qemu-system-x86"], "installing qemu-system-x86", env=environment)

    # -- packages from the archive ----------------------------------------

    def _refresh_private_lists(self):
        os.makedirs(os.path.join(self.apt_dir, "lists", "partial"), exist_ok=True)
        os.makedirs(os.path.join(self.apt_dir, "empty"), exist_ok=True)
        with open(os.path.join(self.apt_dir, "sources.list"), "w") as sources:
            sources.write("deb [signed-by=%s] %s %s main\n"
                          % (ARCHIVE_KEYRING, debian_mirror(system_source_texts()), self.suite))
        self.say("downloading Debian %s's package index (private to the testbed cache)" % self.suite)
        self._run(["apt-get", "-q"] + self._private_apt_options() + ["update"],
                  "apt-get update for %s" % self.suite)

    def _show(self, package, apt_options):
        return control_fields(self._run(["apt-cache"] + apt_options + ["show", "--no-all-versions", package],
                                        "looking up %s" % package))

    def _download(self, package, apt_options, directory):
        """Downloads one package's .deb into `directory`; returns (path, version)."""
        os.makedirs(directory, exist_ok=True)
        version = self._show(package, apt_options).get("Version")
        if not version:
            raise ProvisionError("apt-cache shows no version of %s" % package)
        expected_name = deb_filename_prefix(package, version)
        for name in os.listdir(directory):
            if name.startswith(expected_name) and name.endswith(".deb"):
                return os.path.join(directory, name), version
        self.say("downloading %s %s" % (package, version))
        self._run(["apt-get", "-q"] + apt_options + ["download", "%s=%s" % (package, version)],
                  "downloading %s" % package, cwd=directory)
        for name in os.listdir(directory):
            if name.startswith(expected_name) and name.endswith(".deb"):
                return os.path.join(directory, name), version
        raise ProvisionError("apt-get download left no %s*.deb in %s" % (expected_name, directory))

    def _fetch_kernel(self):
        self._refresh_private_lists()
        options = self._private_apt_options()
        meta = self._show(KERNEL_METAPACKAGE, options)
        images = [name for name in parse_depends(meta.get("Depends", ""))
                  if name.startswith("linux-image-")]
        if not images:
            raise ProvisionError("%s in %s depends on no kernel image" % (KERNEL_METAPACKAGE, self.suite))
        packages = kernel_packages(images[0], parse_depends(self._show(images[0], options).get("Depends", "")))
        downloads = [self._download(package, options, os.path.join(self.cache, "debs")) for package in packages]
        debs, version = [deb for deb, _ in downloads], downloads[0][1]
        tree = os.path.join(self.cache, "kernel-" + version)
        if not os.path.isdir(tree):
            shutil.rmtree(tree + ".partial", ignore_errors=True)
            for deb in debs:
                self.say("unpacking %s" % os.path.basename(deb))
                self._run(["dpkg-deb", "-x", deb, tree + ".partial"], "unpacking the kernel package")
            os.replace(tree + ".partial", tree)
        modules_base = next((base for base in (os.path.join(tree, "usr/lib/modules"),
                                               os.path.join(tree, "lib/modules"))
                             if os.path.isdir(base)), None)
        if modules_base is None:
            raise ProvisionError("%s (%s) holds no modules directory" % (", ".join(packages), self.suite))
        release = sorted(os.listdir(modules_base))[-1]
        vmlinuz = next((path for path in vmlinuz_candidates(tree, modules_base, release)
                        if os.path.exists(path)), None)
        if vmlinuz is None:
            raise ProvisionError("%s (%s) holds no vmlinuz for %s" % (", ".join(packages), self.suite, release))
        self._check_config(config_candidates(tree, modules_base, release), release)
        return {"suite": self.suite, "package": images[0], "version": version, "release": release,
                "vmlinuz": vmlinuz, "modules": os.path.join(modules_base, release),
                "deb": debs[0], "debs": debs}

    def _check_config(self, candidates, release):
        for path in candidates:
            if os.path.exists(path):
                with open(path) as config:
                    problems = config_problems(config.read())
                if problems:
                    raise ProvisionError("kernel %s (%s) cannot host Xen guests: it needs %s"
                                         % (release, self.suite, ", ".join(problems)))
                return
        self.say("kernel %s ships no config: not checked for CONFIG_KVM_XEN" % release)

    def _fetch_busybox(self):
        deb, version = self._download("busybox-static", [], os.path.join(self.cache, "debs"))
        tree = os.path.join(self.cache, "busybox-" + version.replace(":", "_"))
        if not os.path.isdir(tree):
            self._run(["dpkg-deb", "-x", deb, tree + ".partial"], "unpacking busybox-static")
            os.replace(tree + ".partial", tree)
        for candidate in ("bin/busybox", "usr/bin/busybox"):
            if os.path.exists(os.path.join(tree, candidate)):
                return {"version": version, "path": os.path.join(tree, candidate), "deb": deb}
        raise ProvisionError("busybox-static %s contains no busybox binary" % version)

    # -- state --------------------------------------------------------------

    def _load_state(self, path=None):
        try:
            with open(path or self.state_path) as state_file:
                return json.load(state_file)
        except (OSError, ValueError):
            return {}

    def _all_states(self):
        """The usable states of every kernel choice: what the cache must keep."""
        states = [self._load_state(os.path.join(self.cache, state_filename(suite)))
                  for suite in KERNEL_SUITES]
        return [state for state in states if self._state_usable(state)]

    def _state_usable(self, state):
        try:
            return (os.path.exists(state["kernel"]["vmlinuz"])
                    and os.path.isdir(state["kernel"]["modules"])
                    and os.path.exists(state["busybox"]["path"]))
        except (KeyError, TypeError):
            return False

    def _initramfs_path(self, state):
        key = build.initramfs_key(state["kernel"]["version"], state["busybox"]["version"],
                                  build.DEFAULT_MODULES, AGENT_FILES + [INIT_SCRIPT])
        return os.path.join(self.cache, "initramfs-%s.cpio" % key)

    def ensure(self, refresh=False, install_qemu=True):
        """Everything needed to boot L1; builds what is missing or out of date."""
        qemu = self.qemu(install=install_qemu)
        state = self._load_state()
        if not refresh and self._state_usable(state) and os.path.exists(self._initramfs_path(state)):
            return Artifacts(qemu, state, self._initramfs_path(state), self.cache)
        with locked(os.path.join(self.cache, "lock")):
            state = self._load_state()      # another run may have finished meanwhile
            if refresh or not self._state_usable(state):
                state = {"kernel": self._fetch_kernel(), "busybox": self._fetch_busybox()}
                os.makedirs(self.cache, exist_ok=True)
                build.write_atomically(self.state_path, json.dumps(state, indent=1).encode())
                self._remove_stale()
            initramfs = self._initramfs_path(state)
            if not os.path.exists(initramfs):
                self._build_initramfs(state, initramfs)
        return Artifacts(qemu, state, initramfs, self.cache)

    def _build_initramfs(self, state, path):
        self.say("building the L1 initramfs for kernel %s" % state["kernel"]["release"])
        tree = build.ModuleTree(state["kernel"]["modules"])
        names = tree.resolve(build.DEFAULT_MODULES)
        modules = [(name, tree.load(name)) for name in names]
        image = build.build_initramfs(state["busybox"]["path"], INIT_SCRIPT, AGENT_FILES, modules)
        build.write_atomically(path, image)
        # The other kernel choices' current initramfs stay, and so do the
        # newest few others: a run from another checkout (other agent
        # sources, another key) may have built one and be waiting for the
        # run lock to boot it.
        prune_initramfs(self.cache, {path} | {self._initramfs_path(other) for other in self._all_states()})

    def _remove_stale(self):
        """Drops kernels, busyboxes and packages that no kernel choice's state names."""
        keep = cache_entries_in_use(self._all_states())
        for directory in (self.cache, os.path.join(self.cache, "debs")):
            for name in os.listdir(directory):
                if name.startswith(("kernel-", "busybox-", "linux-image-", "modules-")) and name not in keep:
                    path = os.path.join(directory, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


class Artifacts:
    def __init__(self, qemu, state, initramfs, cache):
        self.qemu = qemu
        self.kernel = state["kernel"]
        self.vmlinuz = state["kernel"]["vmlinuz"]
        self.initramfs = initramfs
        self.cache = cache

    def extra_modules(self, names):
        """Decompressed copies of `names` and what they need beyond the boot modules, in load order."""
        if not names:
            return []
        tree = build.ModuleTree(self.kernel["modules"])
        already = set(tree.resolve(build.DEFAULT_MODULES))
        wanted = [name for name in tree.resolve(names) if name not in already]
        return tree.materialize(wanted, os.path.join(self.cache, "modules-" + self.kernel["version"]))


def default_say(message):
    print("testbed: " + message, file=sys.stderr, flush=True)
