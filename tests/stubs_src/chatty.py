"""Test stub that prints a line to stdout and one to stderr when it starts."""

import sys

from protofly.stub import ProtoStub


class Chatty(ProtoStub):
    def __init__(self, url, bus, config):
        super().__init__(url, bus, config)
        print("hello from the stub")
        print("a warning from the stub", file=sys.stderr)
