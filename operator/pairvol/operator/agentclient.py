"""Async client of the node agent's HTTP API (DESIGN.md §3), as the operator uses it.

Every call carries the volume's bearer token. Agent errors come back as
``{"error": text}`` with a status code that means something (400 bad input, 401 token,
409 illegal in this stage/role or stale epoch, 500 failure); :class:`AgentError` keeps both
so the reconcile loop can tell "retry later" from "this will never work".
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp

from pairvol.errors import PairvolError
from pairvol.httpsession import LazySession

log = logging.getLogger(__name__)


class AgentError(PairvolError):
    """An agent call failed; ``status`` is the HTTP status, 0 if the agent did not answer."""

    def __init__(self, address: str, call: str, status: int, message: str) -> None:
        self.address, self.call, self.status, self.message = address, call, status, message
        super().__init__(f"agent {address} {call}: {status or 'unreachable'} {message}")


class LinkChanged(AgentError):
    """A secondary refused a cut: a primary linked to it again since the caller saw the pair
    in sync, so a resync may be rewriting it (docs/correctness.md S5). Not a failure: the
    restore point it had stays, and the next cut once the pair is in sync again is cut."""


# how the agent's refusal begins (agent/replica.py, Replica._cut); the contract test
# (tests/integration/test_agentclient_contract.py) holds the two together
LINK_CHANGED = "a primary linked to this secondary again"


def _session() -> aiohttp.ClientSession:
    # No cap on connections (aiohttp's default is 100): a status poll must never wait for a
    # free connection inside its short timeout while role calls of other volumes hold
    # theirs for a whole full sync, or a healthy agent looks dead. The number of calls in
    # flight is bounded by the loops: a few per volume.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


class AgentClient:
    """One shared HTTP session for all agents; ``token`` is passed per call (per volume)."""

    def __init__(self, timeout_s: float = 5.0, long_timeout_s: float = 600.0) -> None:
        self.timeout_s = timeout_s
        self.long_timeout_s = long_timeout_s
        self._session = LazySession(_session)

    async def close(self) -> None:
        await self._session.close()

    async def _call(
        self,
        address: str,
        method: str,
        path: str,
        token: str | None,
        body: Any = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        url = f"http://{address}{path}"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
        call = f"{method} {path}"
        try:
            async with self._session.get().request(method, url, json=body, headers=headers, timeout=timeout) as resp:
                text = await resp.text()
                try:
                    data = json.loads(text) if text else {}
                except ValueError:
                    data = {"error": text}
                if resp.status >= 400:
                    msg = data.get("error", text) if isinstance(data, dict) else text
                    raise AgentError(address, call, resp.status, str(msg))
                if not isinstance(data, dict):
                    raise AgentError(address, call, resp.status, f"expected an object: {text!r}")
                return data
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AgentError(address, call, 0, repr(exc)) from exc

    async def healthz(self, address: str) -> bool:
        try:
            await self._call(address, "GET", "/healthz", None)
            return True
        except AgentError:
            return False

    async def status(self, address: str, token: str, timeout_s: float = 1.0) -> dict[str, Any]:
        """Short timeout: a dead node must not stall the reconcile loop that detects it."""
        return await self._call(address, "GET", "/v1/status", token, timeout_s=timeout_s)

    async def secondary(self, address: str, token: str, epoch: int) -> dict[str, Any]:
        return await self._call(
            address, "POST", "/v1/secondary", token, {"epoch": epoch}, timeout_s=self.long_timeout_s
        )

    async def primary(
        self,
        address: str,
        token: str,
        epoch: int,
        peer: str | None,
        sync: str,
        peer_epoch: int | None = None,
        peer_disk: str | None = None,
        peer_api: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"epoch": epoch, "peer": peer, "sync": sync}
        if peer_epoch is not None:
            body["peerEpoch"] = peer_epoch
        if peer_disk is not None:
            body["peerDisk"] = peer_disk
        if peer_api is not None:
            body["peerApi"] = peer_api
        return await self._call(address, "POST", "/v1/primary", token, body, timeout_s=self.long_timeout_s)

    async def checkpoint(self, address: str, token: str, link_serial: str | None = None) -> dict[str, Any]:
        """``link_serial``: the primary's ``replication.link.serial`` as read while the pair
        was in sync; a secondary the primary linked to again since refuses the cut
        (:class:`LinkChanged`). Without it the cut is not checked against the link."""
        body = {"linkSerial": link_serial} if link_serial is not None else {}
        try:
            return await self._call(address, "POST", "/v1/checkpoint", token, body)
        except AgentError as exc:
            if exc.status == 409 and LINK_CHANGED in exc.message:
                raise LinkChanged(exc.address, exc.call, exc.status, exc.message) from None
            raise

    async def failover(
        self, address: str, token: str, epoch: int, mode: str, trigger: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"epoch": epoch, "mode": mode}
        if trigger is not None:
            body["trigger"] = trigger
        return await self._call(address, "POST", "/v1/failover", token, body, timeout_s=self.long_timeout_s)

    async def stop(self, address: str, token: str, epoch: int | None = None) -> dict[str, Any]:
        """``epoch``: the epoch the caller planned with; an agent at another one refuses."""
        return await self._call(address, "POST", "/v1/stop", token, {} if epoch is None else {"epoch": epoch})

    async def resize(self, address: str, token: str, epoch: int, size: int) -> dict[str, Any]:
        return await self._call(
            address, "POST", "/v1/resize", token, {"epoch": epoch, "size": size}, timeout_s=self.long_timeout_s
        )
