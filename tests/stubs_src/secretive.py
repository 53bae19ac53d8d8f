"""Test stub that receives credentials, prints them (as careless code might), then fails to log in."""

from protofly.stub import ProtoStub


class Secretive(ProtoStub):
    async def connect(self, credentials=None):
        print("logging in with", (credentials or {}).get("password"))
        raise PermissionError("login refused by the message node")
