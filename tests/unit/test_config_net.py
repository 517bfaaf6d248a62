"""--net parsing and checks, and the generated MAC."""

from pathlib import Path

import pytest

from pyvmm.config import ConfigError, VmConfig
from pyvmm.xen.backends.net.spec import NicSpec as NetOption, parse_net_option
from pyvmm.xen.backends.net.vif import generated_mac


def test_parse_tap_and_mac():
    assert parse_net_option("tap=vif0") == NetOption("vif0", None)
    assert parse_net_option("tap=vif0,mac=00:16:3E:1:2:3") == NetOption("vif0", "00:16:3e:01:02:03")


@pytest.mark.parametrize("text", ["", "vif0", "tap=", "tap=a/b", "tap=vif0,mac=01:00:00:00:00:01",
                                  "tap=vif0,bridge=br0", "mac=00:16:3e:00:00:01"])
def test_bad_net_options(text):
    with pytest.raises(ConfigError):
        parse_net_option(text)


def test_two_nets_on_one_tap_and_no_xen_are_refused(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"x")
    with pytest.raises(ConfigError, match="share a TAP"):
        VmConfig(kernel=Path(kernel), devices=(NetOption("t0"), NetOption("t0"))).validate()
    with pytest.raises(ConfigError, match="Xen mode"):
        VmConfig(kernel=Path(kernel), xen=False, devices=(NetOption("t0"),)).validate()


def test_generated_mac_is_stable_unicast_and_in_xen_oui():
    mac = generated_mac("guest", 0)
    assert mac == generated_mac("guest", 0) != generated_mac("guest", 1) != generated_mac("other", 0)
    assert mac.startswith("00:16:3e:") and int(mac.split(":")[3], 16) < 0x80
