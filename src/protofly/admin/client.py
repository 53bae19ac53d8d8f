"""The client of a runtime's admin API, as the CLI commands (and any Python caller) use it.

Every call is one short HTTP request over the unix socket, bounded by a timeout; the deploy calls read the
server's NDJSON stream line by line, so the caller sees each runtime event as it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, cast
from urllib.parse import quote

import aiohttp

from protofly.admin.protocol import DEPLOY_GRACE, MAX_EVENT_LINE, AdminError, AdminUnavailableError
from protofly.state import StateDirError, check_socket

__all__ = ["AdminClient"]


class AdminClient:
    """Talks to a runtime's admin API over its unix socket: ``async with AdminClient(path) as admin``.

    Raises :class:`~protofly.admin.protocol.AdminUnavailableError` when no runtime listens there and
    :class:`~protofly.admin.protocol.AdminError` with the server's text and status for a refused request.
    """

    def __init__(self, path: Path | str, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminClient:
        connector = aiohttp.UnixConnector(path=str(self.path))
        self._session = aiohttp.ClientSession(
            base_url="http://protofly-admin", connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout)
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def runtime(self) -> dict[str, Any]:
        """The runtime's URL, domain, pid, version, admin socket, stub count and configuration."""
        return cast(dict[str, Any], await self._json("GET", "/runtime"))

    async def stubs(self) -> list[dict[str, Any]]:
        """Every stub as :func:`protofly.admin.views.stub_view` shows it."""
        return cast(list[dict[str, Any]], await self._json("GET", "/stubs"))

    async def unload(self, domain: str) -> dict[str, Any]:
        """Unload ``domain``'s stub; returns the stub as it was last seen."""
        return cast(dict[str, Any], await self._json("DELETE", f"/stubs/{quote(domain, safe='')}"))

    async def set_credentials(self, domain: str, credentials: Mapping[str, Any]) -> dict[str, Any]:
        """Give ``domain``'s stub new credentials (used from its next connect; ``retry`` reconnects now)."""
        path = f"/stubs/{quote(domain, safe='')}/credentials"
        return cast(dict[str, Any], await self._json("PUT", path, json=dict(credentials)))

    async def send(self, msg: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """Send a message (``from`` defaults to ``<runtimeURL>/cli``) and return the response message."""
        params = {} if timeout is None else {"timeout": str(timeout)}
        wait = (timeout or self.timeout) + DEPLOY_GRACE
        return cast(dict[str, Any], await self._json("POST", "/send", json=dict(msg), params=params, total=wait))

    def deploy(self, reference: str, *, timeout: float = 300.0) -> AsyncIterator[dict[str, Any]]:
        """The deploy events of ``reference`` (a domain or a catalogue URL) as they come; the last is the result."""
        return self._events(f"/stubs/{quote(reference, safe='')}", timeout)

    def retry(self, domain: str, *, timeout: float = 300.0) -> AsyncIterator[dict[str, Any]]:
        """Like :meth:`deploy`, after forgetting the stub's crash history and backoff (a fresh catalogue fetch)."""
        return self._events(f"/stubs/{quote(domain, safe='')}/retry", timeout)

    # -- plumbing ------------------------------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use 'async with AdminClient(path)'")
        return self._session

    async def _json(self, method: str, path: str, *, total: float | None = None, **kwargs: Any) -> Any:
        timeout = aiohttp.ClientTimeout(total=total or self.timeout)
        async with self._guard():
            async with self.session.request(method, path, timeout=timeout, **kwargs) as response:
                await _raise_for_error(response)
                return await response.json(content_type=None)

    async def _events(self, path: str, timeout: float) -> AsyncIterator[dict[str, Any]]:
        async with self._guard():
            async with self.session.post(path, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                await _raise_for_error(response)
                buffer = b""
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    if len(buffer) > MAX_EVENT_LINE:
                        raise AdminError(f"an event line is over {MAX_EVENT_LINE} bytes", 502)
                    for line in lines:
                        if line.strip():
                            yield json.loads(line)
                if buffer.strip():
                    yield json.loads(buffer)

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        """Turn transport failures into the two errors the CLI knows how to explain.

        The socket is checked first (:func:`protofly.state.check_socket`): a socket another user owns, or
        could have swapped in, is never connected to, so root's CLI cannot be shown a fake runtime.
        """
        try:
            await asyncio.to_thread(check_socket, self.path)
        except StateDirError as exc:
            raise AdminError(str(exc), 403) from None
        try:
            yield
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror if exc.os_error is not None else str(exc)
            if isinstance(exc.os_error, PermissionError):
                raise AdminError(
                    f"permission denied on {self.path}: {reason} (the runtime's socket is reachable only by the "
                    "user running it: run the command as that user)",
                    403,
                ) from None
            raise AdminUnavailableError(
                f"no protofly runtime is listening on {self.path} ({reason}); start one with 'protofly runtime serve'",
                503,
            ) from None
        except TimeoutError:
            raise AdminError(f"the runtime at {self.path} did not answer in time", 504) from None
        except aiohttp.ClientError as exc:
            raise AdminError(f"talking to the runtime at {self.path} failed: {exc}", 502) from None
        except json.JSONDecodeError as exc:
            raise AdminError(f"the runtime at {self.path} sent something that is not JSON: {exc}", 502) from None


async def _raise_for_error(response: aiohttp.ClientResponse) -> None:
    if response.status < 400:
        return
    text = await response.text()
    try:
        body = json.loads(text)
        raise AdminError(str(body["error"]), response.status, body.get("field"))
    except (ValueError, KeyError, TypeError):
        raise AdminError(f"HTTP {response.status}: {text[:200]}", response.status) from None
