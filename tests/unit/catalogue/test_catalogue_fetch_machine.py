"""The fetch state machine without sockets: candidates, fallbacks, 304, offline reuse, update checks."""

from __future__ import annotations

import hashlib
import json

import msgspec
import pytest

from protofly.catalogue import (
    E_CHANGED,
    E_DIGEST,
    E_FETCH,
    E_ROLLBACK,
    E_SCHEMA,
    E_TOO_LARGE,
    E_UNSIGNED,
    E_UNTRUSTED,
    CatalogueError,
    SigningKey,
    TrustStore,
    parse_descriptor,
    sign_descriptor,
)
from protofly.catalogue.fetch import (
    CachedStub,
    Done,
    Fail,
    Get,
    Response,
    StubFetch,
    plan,
    source_url_for,
    transport_url,
)

SOURCE = b"class EchoStub:\n    pass\n"
RESOLVER = {"b.test": "http://127.0.0.1:1001", "a.test": "http://127.0.0.1:1002"}
CAT = "http://127.0.0.1:1001/.well-known/protocolstub/default"
STATIC = "http://127.0.0.1:1001/.well-known/protocolstub/default.ps.json"
HOME = "http://127.0.0.1:1002/.well-known/protocolstub/b.test"
HOME_STATIC = "http://127.0.0.1:1002/.well-known/protocolstub/b.test.ps.json"


@pytest.fixture(scope="module")
def keys():
    return {"b.test": SigningKey.generate("b.test"), "a.test": SigningKey.generate("a.test")}


@pytest.fixture
def trust(keys):
    return TrustStore({d: [k.public_raw] for d, k in keys.items()})


def descriptor(key, *, version="1.0.0", source=SOURCE, embed=True, name="echo", publisher=None):
    raw = {
        "objectName": name,
        "version": version,
        "language": "python",
        "publisher": publisher or key.domain,
        "sourcePackage": {"sourceCodeClassname": "EchoStub", "sha256": hashlib.sha256(source).hexdigest()},
    }
    raw = sign_descriptor(raw, key)
    if embed:
        raw["sourcePackage"] = {**raw["sourcePackage"], "sourceCode": source.decode(), "encoding": "utf-8"}
    return raw


def body(raw):
    return json.dumps(raw).encode()


def machine(trust, *, cached=None, policy="require", name="default", refresh=False, now=1000.0, direct=None):
    return StubFetch(
        domain="b.test",
        name=name,
        candidates=plan("b.test", name, home_domain="a.test", resolver=RESOLVER, direct_url=direct),
        cached=cached,
        trust=trust,
        policy=policy,
        now=now,
        resolver=RESOLVER,
        refresh=refresh,
    )


def run_to_done(m, action, responses):
    """Answer each Get from ``responses`` (url → Response | CatalogueError); return the final action."""
    seen = []
    while isinstance(action, Get):
        seen.append(action)
        answer = responses.get(action.url, CatalogueError(E_FETCH, "connection refused", url=action.url))
        action = m.on_error(answer) if isinstance(answer, CatalogueError) else m.on_response(answer)
    return action, seen


def ok(url, raw, **kw):
    return Response(url=url, status=200, body=body(raw), **kw)


def cached_from(done: Done) -> CachedStub:
    entry = done.store
    return CachedStub(entry, parse_descriptor(msgspec.json.decode(entry.descriptor)))


# -- candidate URLs ---------------------------------------------------------------------------------------


def test_plan_without_resolver_uses_well_known_urls():
    urls = [c.url for c in plan("b.test", "default", home_domain="a.test", resolver={})]
    assert urls == [
        "https://catalogue.b.test/.well-known/protocolstub/default",
        "https://b.test/.well-known/protocolstub/default.ps.json",
        "https://catalogue.a.test/.well-known/protocolstub/b.test",
        "https://a.test/.well-known/protocolstub/b.test.ps.json",
    ]


def test_plan_with_resolver_and_signers():
    candidates = plan("b.test", "default", home_domain="a.test", resolver=RESOLVER)
    assert [(c.url, c.layout, c.signer_domain, c.name) for c in candidates] == [
        (CAT, "catalogue", "b.test", "default"),
        (STATIC, "static", "b.test", "default"),
        (HOME, "home", "a.test", "b.test"),
        (HOME_STATIC, "home-static", "a.test", "b.test"),
    ]


def test_named_stubs_and_the_home_domain_have_no_fallback():
    assert [c.layout for c in plan("b.test", "sip", home_domain="a.test", resolver={})] == ["catalogue", "static"]
    assert [c.layout for c in plan("a.test", "default", home_domain="a.test", resolver={})] == ["catalogue", "static"]


def test_direct_url_goes_first_and_is_resolved():
    ref = "hyperty-catalogue://catalogue.b.test/.well-known/protocolstub/echo"
    candidates = plan("b.test", "echo", home_domain="a.test", resolver=RESOLVER, direct_url=ref)
    assert candidates[0].url == "http://127.0.0.1:1001/.well-known/protocolstub/echo"
    assert len(candidates) == 2  # the direct URL is the catalogue-layout URL: no duplicate
    assert transport_url("hyperty-catalogue://catalogue.c.test/.well-known/x", RESOLVER) == (
        "https://catalogue.c.test/.well-known/x"
    )


def test_source_url_rules(keys):
    static = parse_descriptor(descriptor(keys["b.test"], embed=False))
    assert source_url_for(static, STATIC, RESOLVER) == (STATIC.replace(".ps.json", ".ps.py"), "source")
    js = parse_descriptor({"objectName": "x", "language": "javascript"})
    assert source_url_for(js, STATIC, RESOLVER)[0].endswith("default.ps.js")
    assert source_url_for(js, CAT, RESOLVER) is None
    rel = parse_descriptor({"objectName": "x", "language": "js", "sourcePackageURL": "/sourcepackage/X"})
    assert source_url_for(rel, CAT, RESOLVER) == ("http://127.0.0.1:1001/.well-known/sourcepackage/X", "package")
    absolute = parse_descriptor(
        {
            "objectName": "x",
            "language": "js",
            "sourcePackageURL": "hyperty-catalogue://catalogue.b.test/.well-known/sourcepackage/X",
        }
    )
    assert source_url_for(absolute, CAT, RESOLVER)[0] == "http://127.0.0.1:1001/.well-known/sourcepackage/X"
    sentinel = parse_descriptor({"objectName": "x", "language": "js", "sourcePackageURL": "/sourcePackage"})
    assert source_url_for(sentinel, CAT, RESOLVER) == (CAT + "/sourcePackage", "package")


# -- happy paths ------------------------------------------------------------------------------------------


def test_catalogue_layout_one_request(keys, trust):
    m = machine(trust)
    action, seen = run_to_done(m, m.start(), {CAT: ok(CAT, descriptor(keys["b.test"]), etag='"e1"', max_age=60)})
    assert isinstance(action, Done)
    assert [g.url for g in seen] == [CAT]
    stub = action.stub
    assert stub.source == SOURCE and stub.signer == keys["b.test"].key_id and not stub.from_cache
    assert action.store.etag == '"e1"' and action.store.fresh_until == 1060.0
    assert b'"sourceCode"' not in action.store.descriptor  # the source is stored once, by digest


def test_static_layout_fetches_the_source_next_to_it(keys, trust):
    m = machine(trust)
    source_url = STATIC.replace(".ps.json", ".ps.py")
    responses = {
        CAT: Response(url=CAT, status=404, body=b""),
        STATIC: ok(STATIC, descriptor(keys["b.test"], embed=False)),
        source_url: Response(url=source_url, status=200, body=SOURCE),
    }
    action, seen = run_to_done(m, m.start(), responses)
    assert isinstance(action, Done)
    assert [(g.url, g.purpose) for g in seen] == [(CAT, "descriptor"), (STATIC, "descriptor"), (source_url, "source")]
    assert m.attempts[0][1].message == "HTTP 404"


def test_home_fallback_is_signed_by_the_home_domain(keys, trust):
    m = machine(trust)
    raw = descriptor(keys["a.test"], name="b.test")
    action, _ = run_to_done(m, m.start(), {HOME: ok(HOME, raw)})
    assert isinstance(action, Done)
    assert action.stub.signer_domain == "a.test" and action.stub.signer == keys["a.test"].key_id


def test_home_fallback_signed_by_the_stub_domain_is_untrusted(keys, trust):
    m = machine(trust)
    raw = descriptor(keys["b.test"], name="b.test")
    action, _ = run_to_done(m, m.start(), {HOME: ok(HOME, raw)})
    assert isinstance(action, Fail) and action.error.code == E_UNTRUSTED


# -- failures ---------------------------------------------------------------------------------------------


def test_nothing_answers_and_nothing_cached(trust):
    m = machine(trust)
    action, seen = run_to_done(m, m.start(), {})
    assert isinstance(action, Fail)
    assert action.error.code == E_FETCH
    assert len(seen) == 4
    for url in (CAT, STATIC, HOME, HOME_STATIC):
        assert url in str(action.error)
    assert "nothing is cached" in str(action.error)


def test_garbage_moves_on_and_is_reported(trust):
    m = machine(trust)
    garbage = {u: Response(url=u, status=200, body=b"<html>hello</html>") for u in (CAT, STATIC, HOME, HOME_STATIC)}
    action, _ = run_to_done(m, m.start(), garbage)
    assert isinstance(action, Fail) and action.error.code == E_SCHEMA
    assert "not valid JSON" in str(action.error)


def test_too_large_is_the_reported_code(trust):
    m = machine(trust)
    first = m.start()
    action = m.on_error(CatalogueError(E_TOO_LARGE, "body over the limit", url=first.url))
    action, _ = run_to_done(m, action, {})
    assert isinstance(action, Fail) and action.error.code == E_TOO_LARGE


def test_schema_error_stops_at_once(keys, trust):
    m = machine(trust)
    bad = {"objectName": "echo", "language": "python", "configuration": 5}
    action = m.on_response(ok(CAT, bad)) if isinstance(m.start(), Get) else None
    assert isinstance(action, Fail) and action.error.code == E_SCHEMA and "configuration" in str(action.error)


def test_verification_failure_does_not_fall_back(keys, trust):
    m = machine(trust)
    raw = descriptor(keys["b.test"])
    raw["sourcePackage"]["sourceCode"] = "import os\n"
    m.start()
    action = m.on_response(ok(CAT, raw))
    assert isinstance(action, Fail) and action.error.code == E_DIGEST


def test_unsigned_under_require(trust):
    m = machine(trust)
    m.start()
    unsigned = {"objectName": "default", "language": "python", "sourcePackage": {"sourceCode": "x=1"}}
    action = m.on_response(ok(CAT, unsigned))
    assert isinstance(action, Fail) and action.error.code == E_UNSIGNED


# -- cache ------------------------------------------------------------------------------------------------


def first_fetch(keys, trust, **kw):
    m = machine(trust)
    action, _ = run_to_done(m, m.start(), {CAT: ok(CAT, descriptor(keys["b.test"], **kw), etag='"e1"', max_age=60)})
    assert isinstance(action, Done)
    return cached_from(action)


def test_fresh_cache_needs_no_request(keys, trust):
    cached = first_fetch(keys, trust)
    action = machine(trust, cached=cached, now=1030.0).start()
    assert isinstance(action, Done) and action.stub.from_cache and not action.stub.revalidated
    assert action.stub.source == SOURCE


def test_stale_cache_revalidates_with_the_etag(keys, trust):
    cached = first_fetch(keys, trust)
    m = machine(trust, cached=cached, now=2000.0)
    get = m.start()
    assert isinstance(get, Get) and get.url == CAT and get.etag == '"e1"'
    action = m.on_response(Response(url=CAT, status=304, body=b"", etag='"e1"', max_age=60))
    assert isinstance(action, Done) and action.stub.revalidated and action.stub.from_cache
    assert action.refreshed.fresh_until == 2060.0


def test_refresh_ignores_freshness(keys, trust):
    cached = first_fetch(keys, trust)
    assert isinstance(machine(trust, cached=cached, now=1001.0, refresh=True).start(), Get)


def test_cached_url_is_tried_first(keys, trust):
    m = machine(trust)
    raw = descriptor(keys["a.test"], name="b.test")
    action, _ = run_to_done(m, m.start(), {HOME: ok(HOME, raw, etag='"h"')})
    cached = cached_from(action)
    m = machine(trust, cached=cached, now=5000.0)
    get = m.start()
    assert get.url == HOME and get.etag == '"h"'


def test_offline_reuse_when_everything_fails(keys, trust):
    cached = first_fetch(keys, trust)
    m = machine(trust, cached=cached, now=9000.0)
    action, seen = run_to_done(m, m.start(), {})
    assert isinstance(action, Done) and action.stub.offline and action.stub.from_cache
    assert len(seen) == 4 and "unreachable" in action.stub.warnings[0]


def test_offline_reuse_honours_todays_trust_store(keys, trust):
    cached = first_fetch(keys, trust)
    m = machine(TrustStore({"a.test": [keys["a.test"].public_raw]}), cached=cached, now=9000.0)
    action, _ = run_to_done(m, m.start(), {})
    assert isinstance(action, Fail) and action.error.code == E_UNTRUSTED


def test_new_version_replaces_the_cache(keys, trust):
    cached = first_fetch(keys, trust)
    new_source = SOURCE + b"# v2\n"
    m = machine(trust, cached=cached, now=9000.0)
    m.start()
    action = m.on_response(ok(CAT, descriptor(keys["b.test"], version="1.1.0", source=new_source)))
    assert isinstance(action, Done) and action.store.version == "1.1.0" and action.stub.source == new_source


def test_same_source_new_descriptor_version_skips_the_source_download(keys, trust):
    cached = first_fetch(keys, trust)
    m = machine(trust, cached=cached, now=9000.0)
    m.start()
    action = m.on_response(ok(CAT, descriptor(keys["b.test"], version="1.0.1", embed=False)))
    assert isinstance(action, Done) and action.stub.source == SOURCE


def test_rollback(keys, trust):
    cached = first_fetch(keys, trust, version="2.0.0")
    m = machine(trust, cached=cached, now=9000.0)
    m.start()
    action = m.on_response(ok(CAT, descriptor(keys["b.test"], version="1.9.9")))
    assert isinstance(action, Fail) and action.error.code == E_ROLLBACK
    assert "1.9.9" in str(action.error) and "2.0.0" in str(action.error)


def test_changed_bytes_under_the_same_version(keys, trust):
    cached = first_fetch(keys, trust)
    m = machine(trust, cached=cached, now=9000.0)
    m.start()
    action = m.on_response(ok(CAT, descriptor(keys["b.test"], source=SOURCE + b"# sneaky\n")))
    assert isinstance(action, Fail) and action.error.code == E_CHANGED
    assert "same version 1.0.0" in str(action.error)


def test_304_without_a_conditional_request_moves_on(trust):
    m = machine(trust)
    m.start()
    action = m.on_response(Response(url=CAT, status=304, body=b""))
    assert isinstance(action, Get) and action.url == STATIC
    assert "not conditional" in m.attempts[0][1].message
