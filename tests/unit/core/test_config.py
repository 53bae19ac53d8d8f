"""Runtime configuration: defaults, TOML, environment overrides, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from protofly.config import ConfigError, RuntimeConfig


def test_defaults_need_only_a_domain() -> None:
    config = RuntimeConfig(domain="A.Test")
    assert config.domain == "a.test"
    assert config.policy == "require" and config.sandbox == "process"
    assert config.state_dir is None and config.catalogues == {}


def test_toml_tables_are_grouping_only(tmp_path: Path) -> None:
    path = tmp_path / "runtime.toml"
    path.write_text(
        """
domain = "a.test"
state_dir = "~/state"

[catalogue]
policy = "warn"
allow_http_loopback = true

[catalogues]
"B.test" = "http://127.0.0.1:8081"

[sandbox]
sandbox = "in-process"
memory_mb = 256

[restart]
crash_budget = 3
backoff_cap = 2.5
"""
    )
    config = RuntimeConfig.load(path, environ={})
    assert config.policy == "warn" and config.allow_http_loopback is True
    assert config.catalogues == {"b.test": "http://127.0.0.1:8081"}
    assert config.sandbox == "in-process" and config.memory_mb == 256
    assert config.crash_budget == 3 and config.backoff_cap == 2.5
    assert config.state_dir == Path("~/state").expanduser()


def test_environment_overrides_file_and_keywords_override_environment(tmp_path: Path) -> None:
    path = tmp_path / "runtime.toml"
    path.write_text('domain = "a.test"\ndeploy_timeout = 30\n')
    env = {
        "PROTOFLY_DEPLOY_TIMEOUT": "5",
        "PROTOFLY_ALLOW_HTTP_LOOPBACK": "yes",
        "PROTOFLY_CATALOGUES": '{"c.test": "http://127.0.0.1:9"}',
    }
    config = RuntimeConfig.load(path, environ=env)
    assert config.deploy_timeout == 5.0 and config.allow_http_loopback is True
    assert config.catalogues == {"c.test": "http://127.0.0.1:9"}
    assert RuntimeConfig.load(path, environ=env, deploy_timeout=7).deploy_timeout == 7.0
    assert RuntimeConfig.load(environ={"PROTOFLY_DOMAIN": "e.test"}).domain == "e.test"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ('domain = "a.test"\npolicy = "maybe"', {}, "policy"),
        ('domain = "not a domain"', {}, "domain"),
        ('domain = "a.test"\nmemory_mb = 0', {}, "memory_mb"),
        ('domain = "a.test"\nbogus = 1', {}, "unknown setting 'bogus'"),
        ('domain = "a.test"\n[catalogues]\n"b.test" = "ftp://x"', {}, "catalogues"),
        ('domain = "a.test"', {"PROTOFLY_DEPLOY_TIMEOUT": "soon"}, "deploy_timeout"),
        ('domain = "a.test"', {"PROTOFLY_ALLOW_HTTP_LOOPBACK": "perhaps"}, "allow_http_loopback"),
        ('domain = "a.test"', {"PROTOFLY_CATALOGUES": "{nope"}, "CATALOGUES"),
        ("domain = ", {}, "not valid TOML"),
        ("deploy_timeout = 3", {}, "domain: missing"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    path = tmp_path / "runtime.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        RuntimeConfig.load(path, environ=env)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        RuntimeConfig.load(tmp_path / "absent.toml", environ={})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"policy": "maybe"}, "policy: must be one of"),
        ({"sandbox": "vm"}, "sandbox: must be one of"),
        ({"memory_mb": 0}, "memory_mb: must be at least 1"),
        ({"request_timeout": 0.0}, "request_timeout: must be positive"),
        ({"backoff_base": -1.0}, "backoff_base: must be at least 0"),
        ({"backoff_base": 5.0, "backoff_cap": 1.0}, "backoff_cap: must not be below backoff_base"),
        ({"catalogues": {"b.test": "ftp://x"}}, "catalogues"),
    ],
)
def test_a_config_built_in_code_is_checked_against_the_same_annotations(settings, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RuntimeConfig(domain="a.test", **settings)


def test_decoding_checks_the_annotated_constraints_and_names_the_field() -> None:
    with pytest.raises(ConfigError, match="queue_limit"):
        RuntimeConfig.from_mapping({"domain": "a.test", "queue_limit": -3})
    config = RuntimeConfig.from_mapping({"domain": "a.test", "sandbox_preload": [], "state_dir": "/tmp/x"})
    assert config.sandbox_preload == [] and config.state_dir == Path("/tmp/x")
    assert config.as_dict()["state_dir"] == "/tmp/x"
