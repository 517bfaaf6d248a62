"""Xen's xl domain configuration files (xl.cfg(5)), for the keys an HVM guest needs.

`pyvmm run vm.cfg` reads the file people already have for `xl create`.
Two layers:

* `parse_xl(text, filename)`: the file's syntax, a small language of its own
  (not Python): `KEY = VALUE` or `KEY += VALUE` statements separated by
  newlines or `;`; a VALUE is a "string" or 'string' (backslash escapes as in
  C), a number (decimal, 0octal or 0xhex) or a `[list, of, values]` that may
  span lines and end with a comma; `#` starts a comment. A later assignment
  of a key replaces an earlier one; `+=` appends to a string or list.
  Nothing in the file is executed.

* `load_xl_config(path)` / `xl_config_from_text(text, filename)`: the meaning
  of the keys, as an `XlConfig`. Only what pyvmm can honour is accepted.
  Every other key, and every value pyvmm would not honour, is an error that
  names the file and line: pyvmm never silently runs a guest different from
  the one the file describes. Where a setting has no effect on what the
  guest sees but the person should know it is not acted on (a vif's
  `bridge=`, a disk's `backendtype=`, ...), the load logs a warning and keeps
  it in `XlConfig.warnings`.

What maps to what is summarised in `XlConfig.to_run_options`, whose keys are
the keyword names of `pyvmm run`'s options. The device keys (disk, vif, ...)
are the registered device kinds' (pyvmm/xen/backend/kind.py): each kind
parses its own entries into the same DeviceSpec that its `pyvmm run`
option gives, with the file and line as its Origin.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Union

from .config import MAX_VCPUS, MIN_MEMORY, ConfigError, DeviceSpec, Origin
from .core import layout
from .limits import SPECS as _LIMIT_SPECS, LimitError
from .xen.backend import kind as device_kinds
from .xen import backends as _backends  # noqa: F401 - registers the device kinds

log = logging.getLogger(__name__)

XlValue = Union[str, int, tuple]  # a tuple holds further XlValues


class XlConfigError(ConfigError):
    """A problem in an xl config file; the message starts with `FILE:LINE:`."""

    def __init__(self, filename: str, line: int | None, message: str):
        self.filename = filename
        self.line = line
        self.detail = message
        where = f"{filename}:{line}" if line is not None else filename
        super().__init__(f"{where}: {message}")


# --------------------------------------------------------------------------
# Syntax


@dataclass(frozen=True)
class XlSetting:
    """One key's final value, with the line its value starts on.

    `item_lines` gives, for a list value, the line of each element (for
    messages about one disk or vif among several)."""

    key: str
    value: XlValue
    line: int
    item_lines: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Token:
    kind: str  # ident number string = += [ ] , ; newline eof
    text: str
    line: int
    value: object = None


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_NUMBER_WORD = re.compile(r"[0-9][0-9A-Za-z_.]*")
_SIMPLE_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
                   "t": "\t", "v": "\v"}


def _number(text: str) -> int | None:
    """C's strtol(text, base 0), whole string: 42, 052, 0x2a. None if not a number."""
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
        return int(text[2:], 16)
    if re.fullmatch(r"0[0-7]+", text):
        return int(text[1:], 8)
    if re.fullmatch(r"0|[1-9][0-9]*", text):
        return int(text)
    return None


class _Lexer:
    def __init__(self, text: str, filename: str):
        self.text = text
        self.filename = filename
        self.pos = 0
        self.line = 1

    def error(self, message: str, line: int | None = None) -> XlConfigError:
        return XlConfigError(self.filename, self.line if line is None else line, message)

    def tokens(self) -> list[_Token]:
        out: list[_Token] = []
        text = self.text
        while True:
            while self.pos < len(text) and text[self.pos] in " \t\r":
                self.pos += 1
            if self.pos >= len(text):
                out.append(_Token("eof", "", self.line))
                return out
            c = text[self.pos]
            if c == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
                continue
            if c == "\n":
                out.append(_Token("newline", "\n", self.line))
                self.pos += 1
                self.line += 1
                continue
            if c in "[],;=":
                out.append(_Token(c, c, self.line))
                self.pos += 1
                continue
            if text.startswith("+=", self.pos):
                out.append(_Token("+=", "+=", self.line))
                self.pos += 2
                continue
            if c in "\"'":
                out.append(self._string(c))
                continue
            match = _NUMBER_WORD.match(text, self.pos)
            if match:
                word = match.group()
                value = _number(word)
                if value is None:
                    raise self.error(f"{word!r} is not a number (xl.cfg numbers are decimal, 0octal or 0xhex, "
                                     "with no unit: memory is a number of MiB)")
                out.append(_Token("number", word, self.line, value))
                self.pos = match.end()
                continue
            match = _IDENT.match(text, self.pos)
            if match:
                out.append(_Token("ident", match.group(), self.line))
                self.pos = match.end()
                continue
            raise self.error(f"unexpected character {c!r}")

    def _string(self, quote: str) -> _Token:
        text, start_line = self.text, self.line
        self.pos += 1
        data = bytearray()
        while True:
            if self.pos >= len(text) or text[self.pos] == "\n":
                raise self.error("unterminated string", start_line)
            c = text[self.pos]
            self.pos += 1
            if c == quote:
                break
            if c != "\\":
                data += c.encode("utf-8", "surrogateescape")
                continue
            if self.pos >= len(text) or text[self.pos] == "\n":
                raise self.error("unterminated string", start_line)
            e = text[self.pos]
            self.pos += 1
            if e in _SIMPLE_ESCAPES:
                data += _SIMPLE_ESCAPES[e].encode()
            elif e == "x":
                digits = re.match(r"[0-9a-fA-F]{1,2}", text[self.pos:self.pos + 2])
                if not digits:
                    raise self.error("\\x in a string must be followed by hexadecimal digits")
                data.append(int(digits.group(), 16))
                self.pos += digits.end()
            elif e in "01234567":
                digits = re.match(r"[0-7]{1,3}", text[self.pos - 1:self.pos + 2])
                value = int(digits.group(), 8)
                if value > 0xFF:
                    raise self.error(f"octal escape \\{digits.group()} is larger than a byte")
                data.append(value)
                self.pos += digits.end() - 1
            else:
                raise self.error(f"invalid escape \\{e} in a string")
        value = bytes(data).decode("utf-8", "surrogateescape")
        return _Token("string", value, start_line, value)


def _describe(token: _Token) -> str:
    return {"eof": "the end of the file", "newline": "the end of the line", "string": "a string",
            "number": f"the number {token.text}"}.get(token.kind, repr(token.text))


class _Parser:
    def __init__(self, tokens: list[_Token], lexer: _Lexer):
        self.tokens = tokens
        self.index = 0
        self.lexer = lexer

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def take(self) -> _Token:
        token = self.tokens[self.index]
        if token.kind != "eof":
            self.index += 1
        return token

    def error(self, token: _Token, message: str) -> XlConfigError:
        return XlConfigError(self.lexer.filename, token.line, message)

    def statements(self) -> dict[str, XlSetting]:
        settings: dict[str, XlSetting] = {}
        while True:
            token = self.take()
            if token.kind == "eof":
                return settings
            if token.kind in ("newline", ";"):
                continue
            if token.kind != "ident":
                raise self.error(token, f"expected KEY = VALUE, found {_describe(token)}")
            op = self.take()
            if op.kind not in ("=", "+="):
                raise self.error(op, f"expected '=' after {token.text}, found {_describe(op)}")
            value_token = self.peek()
            value, item_lines = self.value(token.text)
            end = self.take()
            if end.kind not in ("newline", ";", "eof"):
                raise self.error(end, f"expected the end of the line or ';' after the value of {token.text}, "
                                      f"found {_describe(end)}")
            previous = settings.pop(token.text, None)
            if op.kind == "+=" and previous is not None:
                value, item_lines = self.append(token, previous, value, item_lines)
            settings[token.text] = XlSetting(token.text, value, value_token.line, item_lines)

    def append(self, key: _Token, previous: XlSetting, value: XlValue, item_lines):
        if isinstance(previous.value, int) or isinstance(value, int):
            raise self.error(key, f"{key.text} += cannot be used with numbers")
        if isinstance(previous.value, str) and isinstance(value, str):
            return previous.value + value, ()
        if isinstance(previous.value, tuple) and isinstance(value, tuple):
            return previous.value + value, previous.item_lines + item_lines
        raise self.error(key, f"{key.text} += cannot add a list to a string or a string to a list")

    def value(self, key: str) -> tuple[XlValue, tuple[int, ...]]:
        token = self.take()
        if token.kind in ("string", "number"):
            return token.value, ()
        if token.kind == "[":
            return self.list_rest(token, key)
        hint = ""
        if token.kind == "ident" and token.text in ("True", "False", "None", "true", "false", "yes", "no"):
            hint = ": xl.cfg has no booleans of that kind; write 1 or 0"
        elif token.kind == "ident":
            hint = ": strings need quotes"
        raise self.error(token, f"expected a value (a \"string\", a number or a [list]) for {key}, "
                                f"found {_describe(token)}{hint}")

    def skip_newlines(self) -> None:
        while self.peek().kind == "newline":
            self.take()

    def list_rest(self, opening: _Token, key: str) -> tuple[tuple, tuple[int, ...]]:
        items: list[XlValue] = []
        lines: list[int] = []
        self.skip_newlines()
        while True:
            token = self.peek()
            if token.kind == "]":
                self.take()
                return tuple(items), tuple(lines)
            if token.kind == "eof":
                raise self.error(token, f"unterminated list (the [ of {key} on line {opening.line} is never closed)")
            lines.append(token.line)
            value, _ = self.value(key)
            items.append(value)
            self.skip_newlines()
            token = self.take()
            if token.kind == "]":
                return tuple(items), tuple(lines)
            if token.kind == "eof":
                raise self.error(token, f"unterminated list (the [ of {key} on line {opening.line} is never closed)")
            if token.kind != ",":
                raise self.error(token, f"expected ',' or ']' in the list of {key}, found {_describe(token)}")
            self.skip_newlines()


def parse_xl(text: str, filename: str = "<config>") -> dict[str, XlSetting]:
    """The settings of an xl config file, in the order of their last assignment."""
    lexer = _Lexer(text, filename)
    return _Parser(lexer.tokens(), lexer).statements()


def format_xl_value(value: XlValue) -> str:
    """The xl.cfg text of a value; `parse_xl` reads it back unchanged."""
    if isinstance(value, bool):
        raise TypeError("xl.cfg has no booleans; use 0 or 1")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("xl.cfg numbers cannot be negative")
        return str(value)
    if isinstance(value, str):
        out = ['"']
        for ch in value:
            code = ord(ch)
            if ch in '"\\':
                out.append("\\" + ch)
            elif ch == "\n":
                out.append("\\n")
            elif ch == "\t":
                out.append("\\t")
            elif code < 0x20 or code == 0x7F:
                out.append(f"\\x{code:02x}")
            elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
                out.append(f"\\x{code - 0xDC00:02x}")
            elif 0xD800 <= code <= 0xDFFF:
                raise ValueError("a lone surrogate cannot be written to a config file")
            else:
                out.append(ch)
        out.append('"')
        return "".join(out)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_xl_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to an xl config file")


def format_xl(settings: Mapping[str, XlValue]) -> str:
    """An xl config file holding `settings` (key -> value)."""
    lines = []
    for key, value in settings.items():
        if not _IDENT.fullmatch(key):
            raise ValueError(f"{key!r} is not a valid xl.cfg key")
        lines.append(f"{key} = {format_xl_value(value)}\n")
    return "".join(lines)


# --------------------------------------------------------------------------
# Keys


@dataclass(frozen=True)
class XlConfig:
    """The HVM guest an xl config file describes, in pyvmm's terms."""

    name: str
    source: str = "<config>"
    kernel: Path | None = None
    ramdisk: Path | None = None
    cmdline: str | None = None  # None: the file gives none of cmdline, root, extra
    memory_mib: int | None = None
    vcpus: int | None = None
    devices: tuple[DeviceSpec, ...] = ()  # of every kind, each with its Origin (file, line)
    serial: str | None = None  # pyvmm's --serial text: "stdio", "none" or "file:PATH"
    on_reboot: str = "restart"  # "restart" or "destroy"
    on_watchdog: str | None = None  # "destroy", "restart" or "preserve"; None: not given (xl's default: destroy)
    device_model_user: str | None = None  # the sandbox's user (pyvmm run --user)
    limits: tuple[tuple[str, float], ...] = ()  # (pyvmm.limits name, value) for the limit keys given
    cdrom: Path | None = None  # the disk entry with devtype=cdrom (hdc): the firmware boot's CD-ROM
    boot: str | None = None  # "disk" or "cdrom": boot=, for a firmware boot (no kernel=)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def __getattr__(self, name: str) -> tuple[DeviceSpec, ...]:
        """A device kind's specs by its xl key's attribute: config.disks, config.vifs."""
        for kind in device_kinds.with_xl_key():
            if kind.xl.attr == name:
                return tuple(spec for spec in self.__dict__.get("devices", ()) if spec.kind == kind.name)
        raise AttributeError(name)

    def to_run_options(self) -> dict:
        """Keyword values for `pyvmm run`, for the settings the file gives.

        Keys: name, xen (always), kernel and initrd (Path), cmdline, memory
        (bytes), vcpus, serial (text), no_reboot (from on_reboot), on_watchdog, each
        device kind's specs under its xl key's attribute (disks: DiskSpecs,
        vifs: NicSpecs) when the file has any, limits ({name: value},
        pyvmm.limits) when it sets any. Options the person gives on the
        command line win over these."""
        options: dict = {"name": self.name, "xen": True}
        if self.kernel is not None:
            options["kernel"] = self.kernel
        if self.ramdisk is not None:
            options["initrd"] = self.ramdisk
        if self.cmdline is not None:
            options["cmdline"] = self.cmdline
        if self.memory_mib is not None:
            options["memory"] = self.memory_mib * layout.MiB
        if self.vcpus is not None:
            options["vcpus"] = self.vcpus
        if self.serial is not None:
            options["serial"] = self.serial
        options["no_reboot"] = self.on_reboot == "destroy"
        if self.on_watchdog is not None:
            options["on_watchdog"] = self.on_watchdog
        for kind in device_kinds.with_xl_key():
            specs = getattr(self, kind.xl.attr)
            if specs:
                options[kind.xl.attr] = specs
        if self.device_model_user is not None:
            options["sandbox_user"] = self.device_model_user
        if self.limits:
            options["limits"] = dict(self.limits)
        if self.cdrom is not None:
            options["cdrom"] = self.cdrom
        if self.boot is not None and self.kernel is None:  # a kernel= boot ignores boot=, as it always has
            options["boot"] = self.boot
        return options


# Keys that change nothing as long as their value is what pyvmm does anyway:
# key -> (the value pyvmm matches, why another value cannot be honoured).
_FIXED_BOOLEANS = {
    "acpi": (True, "pyvmm always gives the guest ACPI tables"),
    "apic": (True, "pyvmm always gives the guest local APICs and an IOAPIC"),
    "pae": (True, "pyvmm's vCPUs always have PAE"),
    "hap": (True, "KVM always uses the processor's nested paging when it has it"),
    "nx": (True, "pyvmm passes the host's NX bit through"),
    "xen_platform_pci": (True, "pyvmm always gives a Xen guest the platform PCI device "
                               "(pyvmm run --no-xen boots a plain PC guest instead)"),
    "viridian": (False, "pyvmm has no Hyper-V enlightenments"),
    "hpet": (False, "pyvmm has no HPET"),
    "localtime": (False, "pyvmm's RTC keeps UTC"),
    "vnc": (False, "pyvmm has no graphical console"),
    "sdl": (False, "pyvmm has no graphical console"),
    "nographic": (True, "pyvmm has no graphical console"),
    "usb": (False, "pyvmm has no USB controller"),
    "nestedhvm": (False, "pyvmm does not offer nested virtualization"),
}

_KNOWN_KEYS = {"name", "type", "builder", "memory", "maxmem", "vcpus", "maxvcpus", "kernel", "ramdisk",
               "cmdline", "root", "extra", "on_poweroff", "on_reboot", "on_crash", "on_watchdog", "serial",
               "boot", "vga", "dm_restrict", "device_model_user"} | set(_FIXED_BOOLEANS) \
              | {spec.xl_key for spec in _LIMIT_SPECS.values()}


def _known_keys() -> set[str]:
    """The keys above and the device kinds' (disk, vif, ...)."""
    return _KNOWN_KEYS | {kind.xl.key for kind in device_kinds.with_xl_key()}

_ACTIONS = {"destroy", "restart", "rename-restart", "preserve", "coredump-destroy", "coredump-restart",
            "soft-reset"}


class _Keys:
    """Typed access to the settings, with errors at the right line."""

    def __init__(self, settings: dict[str, XlSetting], filename: str):
        self.settings = settings
        self.filename = filename

    def error(self, key: str, message: str, line: int | None = None) -> XlConfigError:
        if line is None:
            line = self.settings[key].line if key in self.settings else None
        return XlConfigError(self.filename, line, message)

    def __contains__(self, key: str) -> bool:
        return key in self.settings

    def string(self, key: str) -> str | None:
        setting = self.settings.get(key)
        if setting is None:
            return None
        if isinstance(setting.value, tuple):
            raise self.error(key, f"{key} must be a single value, not a list")
        return str(setting.value)

    def integer(self, key: str) -> int | None:
        setting = self.settings.get(key)
        if setting is None:
            return None
        value = setting.value
        if isinstance(value, str):
            value = _number(value.strip())
        if not isinstance(value, int):
            raise self.error(key, f"{key} must be a number, not {format_xl_value(setting.value)}")
        return value

    def boolean(self, key: str) -> bool | None:
        value = self.integer(key)
        return None if value is None else value != 0

    def strings(self, key: str) -> list[tuple[str, int]]:
        """A list of strings (a single string counts as a list of one) with their lines."""
        setting = self.settings.get(key)
        if setting is None:
            return []
        if not isinstance(setting.value, tuple):
            return [(str(setting.value), setting.line)]
        out = []
        for item, line in zip(setting.value, setting.item_lines or (setting.line,) * len(setting.value)):
            if isinstance(item, tuple):
                raise self.error(key, f"{key} must be a list of strings, not a list of lists", line)
            out.append((str(item), line))
        return out


def load_xl_config(path: str | Path) -> XlConfig:
    """Read and check an xl config file. Raises ConfigError (XlConfigError) naming file and line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read {str(path)!r}: {error.strerror or error}") from None
    return xl_config_from_text(data.decode("utf-8", "surrogateescape"), str(path))


def xl_config_from_text(text: str, filename: str = "<config>") -> XlConfig:
    """`load_xl_config` for text already in memory; `filename` is used in messages."""
    settings = parse_xl(text, filename)
    known = _known_keys()
    unknown = [setting for key, setting in settings.items() if key not in known]
    if unknown:
        listed = ", ".join(f"{s.key} (line {s.line})" for s in sorted(unknown, key=lambda s: s.line))
        raise XlConfigError(filename, None, f"pyvmm does not support these xl.cfg keys: {listed}")
    keys = _Keys(settings, filename)
    warnings: list[str] = []

    def warn(key: str, message: str, line: int | None = None) -> None:
        warnings.append(f"{filename}:{line or settings[key].line}: {message}")

    _check_type(keys)
    name = keys.string("name")
    if name is None:
        raise XlConfigError(filename, None, "name= is missing (xl requires the domain's name)")
    if not name or "/" in name:
        raise keys.error("name", f"name {name!r}: expected a non-empty name without '/'")

    memory = _matching_pair(keys, "memory", "maxmem", "MiB",
                            "pyvmm gives the guest all its memory at boot and does no ballooning")
    if memory is not None:
        key = "memory" if "memory" in keys else "maxmem"
        if memory * layout.MiB < MIN_MEMORY or memory % 2:
            raise keys.error(key, f"{key}={memory}: pyvmm needs an even number of MiB, at least "
                                  f"{MIN_MEMORY // layout.MiB}")
    vcpus = _matching_pair(keys, "vcpus", "maxvcpus", "vCPUs", "pyvmm starts every vCPU at boot and does "
                                                               "no vCPU hotplug", default_first=1)
    if vcpus is not None and not 1 <= vcpus <= MAX_VCPUS:
        key = "vcpus" if "vcpus" in keys else "maxvcpus"
        raise keys.error(key, f"{key}={vcpus}: pyvmm runs 1 to {MAX_VCPUS} vCPUs")

    kernel = keys.string("kernel")
    ramdisk = keys.string("ramdisk")
    for key, value in (("kernel", kernel), ("ramdisk", ramdisk)):
        if value is not None and not value:
            raise keys.error(key, f"{key} is empty")
    cmdline = _cmdline(keys, warn)

    for key in ("on_poweroff", "on_crash"):
        _action(keys, key, {"destroy"})
    on_reboot = _action(keys, "on_reboot", {"destroy", "restart"}) or "restart"
    on_watchdog = _action(keys, "on_watchdog", {"destroy", "restart", "preserve"})
    serial = _serial(keys)

    for key, (wanted, why) in _FIXED_BOOLEANS.items():
        if key not in keys:
            continue
        if key == "viridian" and isinstance(settings[key].value, tuple):
            if settings[key].value:
                raise keys.error(key, f"viridian: {why}")
            continue
        if keys.boolean(key) != wanted:
            raise keys.error(key, f"{key}={int(not wanted)}: {why}; set {key}={int(wanted)} or remove it")
    boot = keys.string("boot")
    if boot is not None and not re.fullmatch(r"[acd]+", boot):
        raise keys.error("boot", f"boot={boot!r}: network boot is not supported (boot= may list a, c and d: "
                                 "the floppy, which pyvmm does not have, the disk and the CD-ROM)")
    # The first of c (disk) and d (CD-ROM) is what the firmware boots first.
    first = next((letter for letter in boot or "" if letter in "cd"), None)
    boot_device = {"c": "disk", "d": "cdrom"}.get(first)
    vga = keys.string("vga")
    if vga is not None and vga != "none":
        raise keys.error("vga", f"vga={vga!r}: pyvmm has no graphics card; set vga=\"none\" or remove it")

    devices = []
    for kind in device_kinds.with_xl_key():
        devices += _devices(keys, kind.xl, warn)
    cdrom = _cdrom(keys, devices)
    devices = [device for device in devices if not getattr(device, "cdrom", False)]

    # pyvmm is the device model: xl's restrictions of one are its sandbox
    # (docs/SANDBOX.md), which is on unless `pyvmm run --no-sandbox`.
    if keys.boolean("dm_restrict") is False:
        warn("dm_restrict", "dm_restrict=0 is ignored: pyvmm is always sandboxed unless pyvmm run is given "
                            "--no-sandbox")
    device_model_user = keys.string("device_model_user")
    if device_model_user is not None:
        from .sandbox import SandboxError, SandboxOptions

        try:
            SandboxOptions.parse_user(device_model_user)
        except SandboxError as error:
            raise keys.error("device_model_user", str(error).replace("--user", "device_model_user")) from None
    limits = _limits(keys)

    for message in warnings:
        log.warning("%s", message)
    return XlConfig(
        name=name,
        source=filename,
        kernel=Path(kernel) if kernel else None,
        ramdisk=Path(ramdisk) if ramdisk else None,
        cmdline=cmdline,
        memory_mib=memory,
        vcpus=vcpus,
        devices=tuple(devices),
        serial=serial,
        on_reboot=on_reboot,
        on_watchdog=on_watchdog,
        device_model_user=device_model_user,
        limits=limits,
        cdrom=cdrom,
        boot=boot_device,
        warnings=tuple(warnings),
    )


def _check_type(keys: _Keys) -> None:
    kind = keys.string("type")
    builder = keys.string("builder")
    if kind is not None:
        if kind == "pv":
            raise keys.error("type", 'type="pv": pyvmm runs HVM guests only; a PV guest\'s kernel usually boots '
                                     'as an HVM guest too: set type="hvm"')
        if kind == "pvh":
            raise keys.error("type", 'type="pvh": pyvmm runs HVM guests only (a PC with ACPI, an IOAPIC, '
                                     'a serial port and the Xen platform device, which a PVH domain lacks); '
                                     'a PVH-capable Linux kernel boots as an HVM guest: set type="hvm"')
        if kind != "hvm":
            raise keys.error("type", f"type={kind!r}: expected \"hvm\" (pyvmm runs HVM guests)")
        if builder is not None and builder != "hvm":
            raise keys.error("builder", f"builder={builder!r} contradicts type=\"hvm\"")
        return
    if builder is not None:
        if builder == "hvm":
            return
        if builder == "generic":
            raise keys.error("builder", 'builder="generic" makes a PV guest; pyvmm runs HVM guests only: '
                                        'set type="hvm"')
        raise keys.error("builder", f"builder={builder!r}: expected \"hvm\"")
    raise XlConfigError(keys.filename, None, 'no type= (xl makes such a guest a PV guest); pyvmm runs HVM '
                                             'guests only: add type = "hvm"')


def _matching_pair(keys: _Keys, first: str, maximum: str, unit: str, why: str,
                   default_first: int | None = None) -> int | None:
    """memory/maxmem and vcpus/maxvcpus: the maximum must equal the initial value."""
    value = keys.integer(first)
    top = keys.integer(maximum)
    for key, number in ((first, value), (maximum, top)):
        if number is not None and number <= 0:
            raise keys.error(key, f"{key} must be positive")
    if top is None:
        return value
    start = value if value is not None else default_first
    if start is None:  # xl starts the guest with maxmem when memory is absent
        return top
    if start != top:
        given = f"{first}={start}" if value is not None else f"{first} (default {start})"
        raise keys.error(maximum, f"{maximum}={top} differs from {given} {unit}: {why}; "
                                  f"make them equal or remove {maximum}")
    return top


def _cmdline(keys: _Keys, warn) -> str | None:
    cmdline, root, extra = keys.string("cmdline"), keys.string("root"), keys.string("extra")
    if cmdline is not None:
        if root is not None or extra is not None:
            warn("cmdline", "root= and extra= are ignored in favour of cmdline= (as xl does)")
        return cmdline
    if root is not None:
        return f"root={root} {extra}" if extra is not None else f"root={root}"
    return extra


def _action(keys: _Keys, key: str, supported: set[str]) -> str | None:
    action = keys.string(key)
    if action is None or action in supported:
        return action
    if action not in _ACTIONS:
        raise keys.error(key, f"{key}={action!r} is not an xl action")
    meaning = {
        "on_poweroff": "pyvmm ends (status 0) when the guest powers off",
        "on_crash": "pyvmm ends (status 3) when the guest crashes",
        "on_reboot": "pyvmm restarts the guest, or ends with status 2 under on_reboot=\"destroy\"",
        "on_watchdog": "pyvmm ends (status 7), boots the guest again or keeps it paused when a Xen watchdog "
                       "expires",
    }[key]
    choices = " or ".join(f'"{a}"' for a in sorted(supported))
    raise keys.error(key, f"{key}={action!r} is not supported: {meaning}; use {choices}")


def _serial(keys: _Keys) -> str | None:
    if "serial" not in keys:
        return None
    ports = keys.strings("serial")
    used = [(text, line) for text, line in ports if text not in ("none", "null")]
    if len(used) > 1:
        raise keys.error("serial", "pyvmm has one serial port (COM1); the list gives more", used[1][1])
    if not used:
        return "none"
    text, line = used[0]
    if text in ("pty", "stdio"):
        return "stdio"
    if text.startswith("file:") and len(text) > 5:
        return text
    raise keys.error("serial", f"serial={text!r}: pyvmm supports \"pty\" (its standard input and output), "
                               "\"file:PATH\" and \"none\"", line)


def _limits(keys: _Keys) -> tuple[tuple[str, float], ...]:
    """The per-domain limit keys (max_event_channels, xenstore_nodes, ...)."""
    out = []
    for spec in _LIMIT_SPECS.values():
        setting = keys.settings.get(spec.xl_key)
        if setting is None:
            continue
        if isinstance(setting.value, tuple):
            raise keys.error(spec.xl_key, f"{spec.xl_key} must be a single value, not a list")
        try:
            out.append((spec.name, spec.parse(setting.value)))
        except LimitError as error:
            raise keys.error(spec.xl_key, f"{spec.xl_key}={format_xl_value(setting.value)}: {error}") from None
    return tuple(out)


def _devices(keys: _Keys, xl: device_kinds.XlKey, warn) -> list[DeviceSpec]:
    """One device kind's entries, each spec with its Origin: the file, the line, the entry."""
    out: list[DeviceSpec] = []
    seen: dict[str, int] = {}
    key = xl.key
    for text, line in keys.strings(key):
        try:
            device, notes = xl.parse(text)
        except ConfigError as error:
            raise keys.error(key, str(error), line) from None
        for note in notes:
            warn(key, f"{key} {text!r}: {note}", line)
        if xl.unique is not None:
            what, value = xl.unique[0], xl.unique[1](device)
            if value is not None:  # None: nothing this entry could share (a vif on a user network)
                if value in seen:
                    raise keys.error(key, f"{what} {value} is used twice (also on line {seen[value]})", line)
                seen[value] = line
        out.append(replace(device, origin=Origin(key, text, keys.filename, line)))
    return out


def _cdrom(keys: _Keys, devices: list[DeviceSpec]) -> Path | None:
    """The ISO of the disk entry that is a CD-ROM (devtype=cdrom, hdc:cdrom):
    pyvmm has one drive, the secondary master (hdc), as Xen and QEMU place it."""
    drives = [device for device in devices if getattr(device, "cdrom", False)]
    for drive in drives:
        if drive.vdev != "hdc":
            raise keys.error("disk", f"disk {drive.origin.text!r}: pyvmm's CD-ROM drive is the secondary master, "
                                     f"hdc (not {drive.vdev})", drive.origin.line)
    if len(drives) > 1:
        raise keys.error("disk", "pyvmm has one CD-ROM drive (hdc); the file gives more",
                         drives[1].origin.line)
    return drives[0].path if drives else None


def xl_keys() -> Iterable[str]:
    """The keys `load_xl_config` understands."""
    return sorted(_known_keys())
