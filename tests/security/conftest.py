"""The hostile-stub harness: attacks deployed the way a real domain would serve them.

Every hostile stub here is a real stub package: its source (``tests/stubs_src/``) is signed with its own
domain's key, served by that domain's own catalogue server on 127.0.0.1, and deployed on demand by a
real :class:`~protofly.runtime.Runtime` with the process sandbox (bubblewrap, rlimits, Landlock,
seccomp: :func:`assert_confined` checks the stub's isolation record).  The runtime's home domain
``a.test`` (and ``b.test``, for traffic relayed from another runtime) has a real message node and the
real ``stubs/msgnode`` stub, from :class:`protofly.demo.LocalDomains`, so local hyperties are allocated
the normal way.

A test orders an attack with a request from a local hyperty to the hostile domain
(:func:`order`); the stub answers after it has sent the attack on the same channel, so when the answer
is in, the runtime has processed the attack.  Tests then look from the victim's side (what the hyperty
got, what the other stub saw, what the registry and event stream say) and at the counter that recorded
the attempt.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from protofly.catalogue import SigningKey, publish
from protofly.catalogue.server import CatalogueServer
from protofly.demo import LocalDomains
from protofly.hyperty import Hyperty
from protofly.message import response_code
from protofly.registry import StubRecord
from protofly.runtime import Runtime

HOME = "a.test"
#: Another home domain with its own node and runtime: the origin of traffic relayed by a.test's node.
PEER = "b.test"
#: The victim's domain: an honest stub (``holder.py``) serving ``hyperty://c.test/carol``.
VICTIM = "c.test"
#: The attacker's domain.
EVIL = "evil.test"

STUB_SOURCES = Path(__file__).resolve().parents[1] / "stubs_src"
CHECKOUT = Path(__file__).resolve().parents[2]
HAS_BWRAP = shutil.which("bwrap") is not None


class HostileWorld:
    """Home domains with nodes, plus any number of hostile or victim domains, each with key and catalogue."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Fast reconnection: the node-restart scenario should not wait seconds for the home stub.
        self.homes = LocalDomains(
            HOME, PEER, root=root / "homes", stub_settings={"backoffBase": 0.02, "backoffCap": 0.2}
        )
        self.catalogues: dict[str, CatalogueServer] = {}
        self.keys: dict[str, SigningKey] = {}
        self._runtimes = 0

    async def start(self) -> None:
        await self.homes.__aenter__()

    async def close(self) -> None:
        for server in self.catalogues.values():
            await server.stop()
        await self.homes.close()

    async def publish(
        self, domain: str, source: str, classname: str, configuration: dict[str, Any] | None = None
    ) -> CatalogueServer:
        """Sign ``tests/stubs_src/<source>`` with ``domain``'s own key and serve it from ``domain``'s catalogue."""
        key = self.keys.get(domain)
        if key is None:
            key = self.keys[domain] = SigningKey.generate(domain)
            self.homes.trust.add(domain, key.public_raw)
            self.homes.trust.save(self.homes.trust_file)
        package = self.root / "packages" / domain
        package.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(STUB_SOURCES / source, package / "stub.py")
        descriptor = {
            "objectName": "default",
            "version": "1.0.0",
            "language": "python",
            "description": f"hostile-suite stub {source} for {domain}",
            "sourceCodeClassname": classname,
            "configuration": configuration or {},
            "constraints": {},
            "interworking": False,
        }
        (package / "descriptor.json").write_text(json.dumps(descriptor))
        publish(package, self.root / "catalogues" / domain, key, domain)
        server = self.catalogues.get(domain)
        if server is None:
            server = self.catalogues[domain] = CatalogueServer(self.root / "catalogues" / domain, default="default")
            await server.start()
        else:
            await server.reload()
        return server

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """Runtime settings: every catalogue of this world, its own state directory, quick restarts."""
        catalogues = {name: home.catalogue.base_url for name, home in self.homes.domains.items()}
        catalogues.update({name: server.base_url for name, server in self.catalogues.items()})
        self._runtimes += 1
        settings: dict[str, Any] = {
            "catalogues": catalogues,
            "state_dir": self.root / "runtimes" / str(self._runtimes),
            "deploy_timeout": 10.0,
            "request_timeout": 10.0,
            "backoff_base": 0.01,
            "backoff_cap": 0.1,
        }
        settings.update(overrides)
        return settings

    @contextlib.asynccontextmanager
    async def runtime(self, domain: str = HOME, **overrides: Any) -> AsyncIterator[Runtime]:
        """A runtime of ``domain`` with the process sandbox that knows every catalogue and trusts every key."""
        config = self.homes.config(domain, **self.settings(**overrides))
        async with Runtime(config) as runtime:
            yield runtime


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[HostileWorld]:
    hostile = HostileWorld(tmp_path / "world")
    await hostile.start()
    try:
        yield hostile
    finally:
        await hostile.close()


@pytest.fixture(autouse=True)
def _logs_reach_caplog(protofly_logs_reach_caplog: None) -> None:
    """Every test here asserts on what protofly logs (``tests/conftest.py``)."""


async def order(sender: Hyperty, domain: str, timeout: float = 20.0, **attack: Any) -> dict[str, Any]:
    """Have the stub of ``domain`` (deployed on demand) carry out ``attack``; return its report."""
    answer = await sender.request(f"hyperty://{domain}/attacker", "execute", attack, timeout=timeout)
    assert response_code(answer) == 200, answer.body
    value: dict[str, Any] = answer.body["value"]
    return value


def assert_confined(record: StubRecord) -> None:
    """The stub ran behind every layer of the process sandbox, none missing."""
    isolation = record.isolation
    assert isolation["process"] is True, isolation
    assert isolation["landlock"] and isolation["seccomp"] and isolation["no_new_privs"], isolation
    if HAS_BWRAP:
        assert isolation["bwrap"], isolation
        assert isolation["missing"] == [], isolation


def counter(record: StubRecord, name: str) -> int:
    """One of the stub's boundary counters (0 when the runtime has never counted that kind)."""
    return record.counters.get(name, 0)


def runtime_counter(runtime: Runtime, name: str) -> int:
    """One of the runtime-wide counters (deploy bounds, negative cache)."""
    return runtime.counters.get(name, 0)
