"""A new device kind is one declaration and one registration: its option, xl.cfg
key, trace category and fault target then appear everywhere through the registry,
with no other module touched."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import pytest
from click.testing import CliRunner

from pyvmm import cli
from pyvmm.config import ConfigError, DeviceSpec, Origin
from pyvmm.core import faults, trace
from pyvmm.xen import backends
from pyvmm.xen.backend import kind as device_kinds
from pyvmm.xlcfg import xl_config_from_text


# ---- what a new backend folder would hold in its kind.py ----------------------------

@dataclass(frozen=True)
class KeyboardSpec(DeviceSpec):
    kind = "kbd"
    option = "--keyboard"

    layout: str
    origin: Origin | None = field(default=None, compare=False, repr=False)

    def option_text(self) -> str:
        return f"layout={self.layout}"

    def unique(self):
        return ("keyboard", "the one")


def parse_option(text: str, index: int) -> KeyboardSpec:
    key, _, value = text.partition("=")
    if key != "layout" or not value:
        raise ConfigError(f"--keyboard {text!r}: expected layout=NAME")
    return KeyboardSpec(value, origin=Origin("--keyboard", text))


def parse_xl(text: str):
    return KeyboardSpec(text.strip()), []


def keys_pressed(injector, key: str):
    return injector.first("kbd", ("drop",), {"key": key}, lambda rule: rule.key in (None, key))


KBD = device_kinds.DeviceKind(
    name="kbd",
    summary="a PV keyboard",
    option=device_kinds.CliOption("--keyboard", "keyboards", "layout=NAME", "A PV keyboard.", parse_option),
    xl=device_kinds.XlKey("vkb", "keyboards", parse_xl),
    trace=(("kbd", "keys pressed"),),
    faults=(faults.FaultTarget("kbd", ("drop",), {"key": ("key", str)}, {"kbd_key": keys_pressed}),),
    create=lambda domain, specs: [],
)


@pytest.fixture
def registered():
    device_kinds.register(KBD)  # the one line in pyvmm/xen/backends/__init__.py
    yield KBD
    device_kinds.unregister("kbd")


def test_the_kind_appears_in_the_registry(registered):
    assert device_kinds.kinds() == (*backends.KINDS, KBD)
    assert [kind.name for kind in backends.KINDS] == ["blk", "net", "console"]


def test_its_option_is_one_of_pyvmm_runs(registered, tmp_path, monkeypatch):
    import pyvmm.runner

    seen = []
    monkeypatch.setattr(pyvmm.runner, "run_vm", lambda config: seen.append(config) or 0)
    (tmp_path / "k").write_bytes(b"x")
    result = CliRunner().invoke(cli.cli, ["run", "--help"])
    assert "--keyboard layout=NAME" in result.output and "A PV keyboard." in result.output
    result = CliRunner().invoke(cli.cli, ["run", "--no-sandbox", "--kernel", str(tmp_path / "k"),
                                          "--keyboard", "layout=fr"])
    assert result.exit_code == 0, result.output
    assert seen[0].devices == (KeyboardSpec("fr"),)
    result = CliRunner().invoke(cli.cli, ["run", "--no-sandbox", "--kernel", str(tmp_path / "k"),
                                          "--keyboard", "layout=fr", "--keyboard", "layout=de"])
    assert "--keyboard 'layout=fr' and --keyboard 'layout=de' share a keyboard" in result.stderr


def test_its_xl_cfg_key_is_read(registered):
    config = xl_config_from_text('name = "g"\ntype = "hvm"\nvkb = [ "us" ]\n', "vm.cfg")
    assert config.keyboards == (KeyboardSpec("us"),)
    assert str(config.keyboards[0].origin) == "vm.cfg:3: vkb 'us'"
    assert config.to_run_options()["keyboards"] == (KeyboardSpec("us"),)


def test_its_xl_cfg_key_is_unknown_without_it():
    with pytest.raises(ConfigError, match="do(es)? not support these xl.cfg keys: vkb"):
        xl_config_from_text('name = "g"\ntype = "hvm"\nvkb = [ "us" ]\n', "vm.cfg")


def test_its_trace_category_and_fault_target(registered):
    assert "kbd" in trace.CATEGORIES and trace.parse_categories("kbd") == {"kbd"}
    tracer = trace.Tracer()
    tracer.attach({"kbd"}, io.StringIO())
    assert tracer.kbd
    tracer.close()
    injector = faults.FaultInjector()
    rule = injector.add("kbd:drop,key=q,count=1")
    assert injector.kbd and rule.key == "q"
    assert injector.kbd_key("a") is None and injector.kbd_key("q") is rule and injector.kbd_key("q") is None
    with pytest.raises(faults.FaultSpecError):
        faults.FaultRule.parse("kbd:drop,vdev=xvda")


def test_a_vms_tracer_and_injector_know_it(registered, tmp_path):
    """What the runner makes for one VM (open_trace, FaultInjector.from_specs)
    has the kind's category and target; another VM's and the parts built
    alone (NULL_TRACE, NULL_FAULTS) stay off."""
    vm_trace = trace.open_trace(trace.parse_categories("kbd"), tmp_path / "vm.trace")
    vm_faults = faults.FaultInjector.from_specs(["kbd:drop,key=q"], vm_trace)
    other_trace, other_faults = trace.open_trace(frozenset(), None), faults.FaultInjector()
    assert vm_trace.kbd and vm_faults.kbd
    assert not other_trace.kbd and not other_faults.kbd
    assert not trace.NULL_TRACE.kbd and not faults.NULL_FAULTS.kbd
    assert vm_faults.kbd_key("q").spec == "kbd:drop,key=q" and other_faults.kbd_key("q") is None
    vm_trace.close()
    lines = (tmp_path / "vm.trace").read_text().splitlines()
    assert len(lines) == 1 and '"cat":"fault"' in lines[0] and '"key":"q"' in lines[0]


def test_unregistered_it_is_gone_again(registered):
    device_kinds.unregister("kbd")
    assert "kbd" not in trace.CATEGORIES and not hasattr(trace.Tracer, "kbd")
    assert not hasattr(faults.FaultInjector, "kbd") and not hasattr(faults.FaultInjector, "kbd_key")
    with pytest.raises(faults.FaultSpecError):
        faults.FaultRule.parse("kbd:drop")
    assert "--keyboard" not in CliRunner().invoke(cli.cli, ["run", "--help"]).output
    device_kinds.register(KBD)  # for the fixture's unregister
