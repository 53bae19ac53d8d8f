"""A detached session's buffer stream: read in order (repeats dropped), and answered when its session ends.

Used by the claim (a re-opened session takes what waited for it), the forwarder (a nudge to read) and the
record keeper (a session that ended or expired), each through the link's :class:`~protofly.msgnode.cluster.view.Link`.
"""

from __future__ import annotations

import contextlib

from nats.js.errors import NotFoundError

from protofly.msgnode.cluster.view import Link

__all__ = ["BUFFER_ID", "drop_buffer", "take_buffer"]

#: The header naming a buffered forward (``<inbox>.<seq>``), so that a retry that bounced is not delivered twice.
BUFFER_ID = "Pf-Id"


async def take_buffer(link: Link, sid: str, seen: dict[str, None] | None = None) -> list[bytes]:
    """Read session ``sid``'s buffer stream in order, then purge what was read.

    A message buffered by a forwarding node carries its forward's name (header ``Pf-Id``): those in
    ``seen`` (already taken here over the session subject, before their retry bounced) are dropped.
    """
    js = link.js
    assert js is not None
    subject = link.names.buffer(sid)
    frames: list[bytes] = []
    seq = 1
    last = 0
    while len(frames) < link.core.buffer_messages:
        try:
            stored = await js.get_msg(link.names.buffers, seq=seq, subject=subject, next=True)
        except NotFoundError:
            break
        ident = (stored.headers or {}).get(BUFFER_ID)
        if seen is not None and ident is not None and ident in seen:
            link.counters["duplicates"] += 1
        elif stored.data is not None:
            frames.append(stored.data)
            if seen is not None and ident is not None:
                seen[ident] = None
        last = stored.seq or seq
        seq = last + 1
    if last:
        with contextlib.suppress(Exception):
            await js.purge_stream(link.names.buffers, subject=subject, seq=last + 1)
    return frames


async def drop_buffer(link: Link, sid: str) -> None:
    """Session ``sid`` ended or expired: what waits in its buffer stream is a ``404`` to each sender, then purged.

    Reading before purging keeps a message buffered while its session was ending from vanishing unanswered.
    """
    text = "no route: the session it was buffered for ended before it was delivered"
    try:
        frames = await take_buffer(link, sid)
    except Exception as exc:  # unreadable now: purged unanswered (the senders' requests time out)
        link.log.warning("buffer of an ended session not read", error=str(exc) or type(exc).__name__)
        frames = []
    for frame in frames:
        link.apply(link.core.undeliverable(frame, 404, text))
    assert link.js is not None
    with contextlib.suppress(Exception):
        await link.js.purge_stream(link.names.buffers, subject=link.names.buffer(sid))
