"""What the core asks of "the rest of the cluster": the seam between one node's tables and the others.

A single-process node has no remote part (``MessageNodeCore.remote`` is None: today's behaviour, nothing
imported).  A clustered node (``msgnode/cluster/``) plugs in an object with these methods.  They are
synchronous and must not block: they look at caches and queue work for the cluster's own tasks, so the
core stays sans-I/O and the hot path pays nothing when the destination is local.

What needs a round trip before the node may answer (allocating addresses atomically across nodes, claiming
a session another node held) is not a call here: the core returns an action (:class:`Allocate`,
:class:`Claim` in ``actions.py``) and the shell calls the core back with the outcome.
"""

from __future__ import annotations

from typing import Protocol

from protofly.msgnode.session import Session

__all__ = ["ClusterUnavailable", "Remote"]


class ClusterUnavailable(Exception):
    """A clustered node cannot join: its NATS servers are unreachable or JetStream refuses its tables."""


class Remote(Protocol):
    """The cluster as the core sees it (see the module docstring)."""

    def forward(self, to: str, data: bytes) -> bool:
        """Send ``data`` to the session on another node that ``to`` routes to; False when none is known."""
        ...

    def fan_out(self, resource: str, data: bytes) -> bool:
        """Publish to the other nodes' subscribers of ``resource``; False when no other node has any."""
        ...

    def session_changed(self, session: Session, event: str) -> None:
        """``opened``, ``attached``, ``detached``, ``updated`` (addresses, subscriptions) or ``ended``."""
        ...

    def resource_changed(self, resource: str, subscribed: bool) -> None:
        """This node's first subscriber of ``resource`` came (True) or its last one left (False)."""
        ...
