"""How a domain's cluster names things in NATS: buckets, streams, subjects, keys, and the session record.

Everything shared lives under names derived from the domain, so several domains can share one NATS
cluster.  Addresses and resources are URLs; NATS keys and subject tokens allow fewer characters, so they
are carried base64url-encoded.  A session is named by a hash of its URL (which holds its runtime token):
subjects and keys never show a token.
"""

from __future__ import annotations

import base64
import hashlib
import re

import msgspec

__all__ = ["Names", "SessionRecord", "session_id", "token_hash", "url_key"]


def url_key(text: str) -> str:
    """``text`` as a NATS key or subject token (base64url, no padding)."""
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def session_id(url: str) -> str:
    """The name of session ``<runtimeURL>/<token>`` in subjects and keys (knowing it needs the token)."""
    return hashlib.sha256(url.encode()).hexdigest()[:40]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A session as the cluster knows it (bucket ``sessions``): enough for another node to take it over."""

    url: str
    runtime: str
    token_hash: str
    #: The node that holds it now; "" while no node does (its last node stopped gracefully).
    owner: str
    addresses: list[str] = []
    keys: dict[str, list[str]] = {}
    bound: list[str] = []
    subscriptions: dict[str, list[str]] = {}
    #: Wall-clock time (seconds) its socket went away, None while a socket is bound.
    detached_since: float | None = None


class Names:
    """Bucket, stream and subject names of one domain's cluster."""

    def __init__(self, domain: str) -> None:
        token = re.sub(r"[^A-Za-z0-9-]", "_", domain)  # a domain has no "_": one name per domain
        self.token = token
        self.addresses = f"pf_{token}_addresses"
        self.keys = f"pf_{token}_keys"
        self.sessions = f"pf_{token}_sessions"
        self.subscriptions = f"pf_{token}_subscriptions"
        self.nodes = f"pf_{token}_nodes"
        self.bound = f"pf_{token}_bound"
        self.buffers = f"PF_{token}_BUFFERS"
        self.buffer_subjects = f"pf.{token}.b.*"
        self.resend = f"pf.{token}.resend"

    def session(self, sid: str) -> str:
        return f"pf.{self.token}.s.{sid}"

    def buffer(self, sid: str) -> str:
        return f"pf.{self.token}.b.{sid}"

    def resource(self, resource: str) -> str:
        return f"pf.{self.token}.r.{url_key(resource)}"

    def control(self, node: str) -> str:
        return f"pf.{self.token}.n.{node}"

    def inbox(self, node: str) -> str:
        return f"pf.{self.token}.i.{node}"
