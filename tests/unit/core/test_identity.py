"""The identity module: credentials per domain, never printable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protofly.identity import IdentityError, IdentityModule, Secret

SECRET = "s3cr3t-token-value"


def test_credentials_by_domain_from_json_and_toml(tmp_path: Path) -> None:
    as_json = tmp_path / "creds.json"
    as_json.write_text(json.dumps({"b.test": {"token": SECRET}}))
    as_toml = tmp_path / "creds.toml"
    as_toml.write_text(f'["b.test"]\ntoken = "{SECRET}"\n')
    for path in (as_json, as_toml):
        identity = IdentityModule.load(path, environ={})
        assert identity.credentials_for("b.test") == {"token": SECRET}
        assert identity.credentials_for("c.test") is None
        assert SECRET not in repr(identity)


def test_environment_variable_json_or_path(tmp_path: Path) -> None:
    inline = IdentityModule.load(environ={"PROTOFLY_CREDENTIALS": json.dumps({"b.test": {"token": SECRET}})})
    assert inline.credentials_for("b.test") == {"token": SECRET}
    path = tmp_path / "creds.json"
    path.write_text(json.dumps({"c.test": {"user": "u", "password": SECRET}}))
    from_path = IdentityModule.load(environ={"PROTOFLY_CREDENTIALS": str(path)})
    assert from_path.domains() == ["c.test"]
    assert IdentityModule.load(environ={}).domains() == []


def test_secret_never_prints() -> None:
    secret = Secret({"token": SECRET})
    assert SECRET not in repr(secret) and SECRET not in str(secret) and SECRET not in f"{secret}"
    assert secret.reveal() == {"token": SECRET}


@pytest.mark.parametrize(
    "content",
    [
        f'{{"b.test": {{"token": "{SECRET}"',  # truncated JSON
        json.dumps(["b.test"]),
        json.dumps({"b.test": SECRET}),
        json.dumps({"not a domain": {"token": SECRET}}),
    ],
)
def test_bad_files_are_clear_errors_that_do_not_quote_secrets(tmp_path: Path, content: str) -> None:
    path = tmp_path / "creds.json"
    path.write_text(content)
    with pytest.raises(IdentityError) as caught:
        IdentityModule.load(path, environ={})
    assert SECRET not in str(caught.value)
    assert str(path) in str(caught.value)


def test_missing_file_and_bad_env(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="cannot read credentials file"):
        IdentityModule.load(tmp_path / "none.json", environ={})
    with pytest.raises(IdentityError, match="not valid JSON"):
        IdentityModule.load(environ={"PROTOFLY_CREDENTIALS": "{" + SECRET})


def test_equal_secrets_hash_equal() -> None:
    # Two wrappers of the same value are equal, so the eq/hash contract says they must hash alike:
    # a set or dict key must treat them as one.
    first, second = Secret(SECRET), Secret(SECRET)
    assert first == second
    assert hash(first) == hash(second)
    assert len({first, second}) == 1
    assert {first: "a"}[second] == "a"
    assert Secret(SECRET) != Secret("another value")


def test_secret_is_as_hashable_as_its_value() -> None:
    # Credentials are dicts: equality compares their contents, which may change, so they cannot be keys.
    with pytest.raises(TypeError):
        hash(Secret({"token": SECRET}))
