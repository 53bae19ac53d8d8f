"""reTHINK's own artefacts (tests/conformance/data) through the descriptor model and ``catalogue check``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from protofly.catalogue import parse_descriptor
from protofly.catalogue.model import KNOWN_FIELDS

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "conformance" / "data"
DESCRIPTORS = sorted(p for p in DATA.glob("*.json") if p.name != "catalogue-model.json")
PROTOFLY = str(ROOT / ".venv" / "bin" / "protofly")


def test_there_is_conformance_data():
    assert len(DESCRIPTORS) >= 3


@pytest.mark.parametrize("path", DESCRIPTORS, ids=lambda p: p.name)
def test_every_rethink_descriptor_parses(path):
    d = parse_descriptor(path.read_bytes(), url=str(path))
    raw = json.loads(path.read_text())
    assert d.object_name == raw["objectName"]
    assert d.configuration == raw["configuration"]
    assert d.interworking is raw.get("interworking", False)  # gen-1 catalogue objects have none
    assert d.signature is None  # reTHINK writes "" and signs nothing
    assert {k: raw[k] for k in raw if k not in KNOWN_FIELDS} == d.extra


def test_the_interworking_descriptor_in_detail():
    d = parse_descriptor((DATA / "sip.rethink-project.eu.ps.json").read_bytes())
    assert (DATA / "sip.rethink-project.eu.ps.json").read_bytes().startswith(b" ")  # the leading space
    assert d.interworking and d.extra == {"name": "IMSIWProtoStub", "accessControlPolicy": "somePolicy"}
    assert d.message_schemas == "" and d.constraints == {"browser": True}


def test_every_protocolstub_field_of_the_rethink_model_is_modelled():
    model = json.loads((DATA / "catalogue-model.json").read_text())
    stub = next(o for o in model if o["name"].lower() == "protostub")
    fields = {r["name"] for r in stub["resourcedefs"]}
    assert fields <= KNOWN_FIELDS
    package = next(o for o in model if o["name"].lower() == "sourcepackage")
    assert {"sourceCode", "sourceCodeClassname"} <= {r["name"] for r in package["resourcedefs"]}


@pytest.mark.parametrize("path", sorted(DATA.glob("*.json")), ids=lambda p: p.name)
async def test_catalogue_check_accepts_every_file(path):
    proc = await asyncio.create_subprocess_exec(
        PROTOFLY, "catalogue", "check", str(path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert out.decode().startswith(f"{path}: OK (")
