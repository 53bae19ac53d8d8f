"""Long fuzzing runs of the decoders in ``tests/fuzz/targets.py`` with atheris (coverage-guided, libFuzzer).

Each ``fuzz/<target>.py`` calls :func:`main` with its target's name; ``make fuzz`` runs them all for
``FUZZ_SECONDS`` each.  atheris hands over bytes; the first byte chooses whether the target gets them as
``bytes`` or as a ``str`` (decoded with ``surrogatepass``, so lone surrogates reach the decoders too).
Only the decoder's documented error type may escape a target: anything else is a crash and libFuzzer
writes the input to ``crash-*`` in the working directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


#: Valid inputs each target starts from: msgspec is C code atheris cannot see into, so without them the
#: fuzzer would rarely get past the first byte of JSON.
_MESSAGE = b'{"id":1,"type":"create","from":"hyperty://a.test/1","to":"hyperty://b.test/2","body":{"v":[1,2.5,null]}}'
_OPEN = b'{"id":1,"type":"open","from":"hyperty-runtime://a.test/rt","to":"mn:/session","body":{"batch":true}}'
_DESCRIPTOR = (
    b'{"objectName":"echo","version":"1.0","language":"python","configuration":{},"constraints":{},'
    b'"sourcePackage":{"sourceCode":"cHJpbnQoMSk=","encoding":"base64","sourceCodeClassname":"Echo"},'
    b'"sandbox":{"memoryMB":64}}'
)
SEEDS: dict[str, list[bytes]] = {
    "message": [b"\x00" + _MESSAGE, b"\x01" + _MESSAGE],
    "message_batch": [b"\x00[" + _MESSAGE + b"," + _MESSAGE + b"]"],
    "message_frame": [b"\x00[" + _MESSAGE + b"," + _OPEN + b"]", b"\x01" + _MESSAGE],
    "node_frames": [b"\x00" + _MESSAGE, b"\x00[" + _MESSAGE + b"]", b"\x00" + _OPEN],
    "channel": [b"\x00" + len(_MESSAGE).to_bytes(4, "big") + _MESSAGE],
    "descriptor": [b"\x00" + _DESCRIPTOR, b"\x01" + _DESCRIPTOR],
    "admin_send": [b"\x00" + _MESSAGE],
    "http_head": [b'\x00GET /.well-known/protocolstub/default HTTP/1.1\r\nHost: x\r\nIf-None-Match: "a"'],
    "config": [b'\x00domain = "a.test"\n[sandbox]\nmemory_mb = 64\n[catalogues]\n"b.test" = "http://127.0.0.1:1"\n'],
}


def seed(name: str, corpus: Path) -> None:
    """Write the target's seed inputs into an empty corpus directory."""
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        for index, data in enumerate(SEEDS[name]):
            (corpus / f"seed-{index}").write_bytes(data)


def main(name: str) -> None:
    try:
        import atheris
    except ImportError:
        sys.exit("atheris is not installed: pip install atheris (or run 'make fuzz', which falls back to Hypothesis)")
    with atheris.instrument_imports(include=["protofly"]):  # our code only: instrumenting aiohttp takes minutes
        from tests.fuzz.targets import TARGETS

    target = TARGETS[name]
    corpora = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    if corpora:
        seed(name, Path(corpora[0]))

    def one(data: bytes) -> None:
        if not data:
            return
        if data[0] & 1:
            target(data[1:].decode("utf-8", "surrogatepass") if _decodes(data[1:]) else data[1:].decode("latin-1"))
        else:
            target(data[1:])

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return False
    return True
