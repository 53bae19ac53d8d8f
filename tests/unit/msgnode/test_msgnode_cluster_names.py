"""The cluster's names (``msgnode/cluster/names.py``) and the single-process node's independence from NATS."""

from __future__ import annotations

import subprocess
import sys

from protofly.msgnode.cluster.names import Names, session_id, token_hash, url_key


def test_keys_and_subjects_carry_any_url_and_never_a_token() -> None:
    names = Names("b.test")
    url = "hyperty-runtime://a.test/rt/7f3c-secret-token"
    sid = session_id(url)
    assert "secret" not in sid and "secret" not in names.session(sid) and "secret" not in names.buffer(sid)
    assert session_id(url + "x") != sid
    assert token_hash("t") != token_hash("u")
    subject = names.resource("comm://b.test/room 1/changes?x=y")
    assert subject.startswith("pf.b_test.r.") and " " not in subject and subject.count(".") == 3
    key = url_key("hyperty://b.test/é/ü")
    assert set(key) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_two_domains_share_no_name() -> None:
    a, b = Names("a.test"), Names("a-test")
    assert a.token != b.token
    assert not {a.addresses, a.keys, a.sessions, a.subscriptions, a.nodes, a.buffers} & {
        b.addresses,
        b.keys,
        b.sessions,
        b.subscriptions,
        b.nodes,
        b.buffers,
    }


def test_a_single_process_node_does_not_import_nats() -> None:
    code = (
        "import sys, asyncio\n"
        "from protofly.msgnode import MessageNode\n"
        "import protofly.msgnode.cli\n"
        "async def main():\n"
        "    async with MessageNode('b.test', port=0) as node:\n"
        "        assert node.link is None\n"
        "asyncio.run(main())\n"
        "print('nats' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"
