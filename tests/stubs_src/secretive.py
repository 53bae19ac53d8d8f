"""Test stub that receives credentials, prints them and quotes them in its error (as careless code might)."""

from protofly.stub import ProtoStub


class Secretive(ProtoStub):
    async def connect(self, credentials=None):
        password = (credentials or {}).get("password")
        print("logging in with", password)
        raise PermissionError(f"login refused by the message node for password {password}")
