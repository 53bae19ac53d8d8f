"""The interworking stubs' address mappings, loaded as a sandbox loads them (a module from its file)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

STUBS = Path(__file__).resolve().parents[3] / "stubs"


def load(name: str) -> ModuleType:
    module_name = f"protofly_test_{name}_stub"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, STUBS / name / "stub.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@pytest.mark.parametrize(
    ("address", "jid"),
    [
        ("xmpp://bob@chat.test", "bob@chat.test"),
        ("xmpp://Bob@Chat.Test", "bob@chat.test"),
        ("user://chat.test/bob", "bob@chat.test"),  # reTHINK's user-address form
        ("xmpp://chat.test/presence", None),  # a resource, not a user
        ("xmpp://bob@other.test", None),  # another domain's user is not this stub's
        ("user://chat.test/a/b", None),
        ("hyperty://chat.test/123", None),
    ],
)
def test_xmpp_addresses_name_bare_jids(address, jid) -> None:
    assert load("xmpp").jid_of(address, "chat.test") == jid


def test_xmpp_users_come_back_as_bare_jid_addresses() -> None:
    assert load("xmpp").user_address("Bob@chat.test/phone") == "xmpp://bob@chat.test"


@pytest.mark.parametrize(
    ("address", "topic"),
    [
        ("mqtt://iot.test/sensors/kitchen/temp", "sensors/kitchen/temp"),
        ("mqtt://iot.test/sensors/#", "sensors/#"),  # '#' is the wildcard, not a URL fragment
        ("mqtt://iot.test/sensors/+/temp", "sensors/+/temp"),
        ("mqtt://IOT.test/a", "a"),
        ("mqtt://iot.test/", None),
        ("mqtt://iot.test", None),
        ("mqtt://other.test/a", None),
        ("xmpp://iot.test/a", None),
    ],
)
def test_mqtt_addresses_name_topics(address, topic) -> None:
    assert load("mqtt").topic_of(address, "iot.test") == topic
