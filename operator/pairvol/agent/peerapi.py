"""What a primary asks its secondary's agent directly, with the volume's API token (the
agents of a volume share it): that it end every replication connection before the primary
links to it again (docs/correctness.md R5).

Why a call and not the link itself: a connection the primary gave up on is not gone on the
secondary's side. After a silent partition the secondary still holds it, and the primary's
kernel still holds the writes it had sent on it (an orphaned socket keeps retransmitting
after its process died); when the partition heals they arrive, on a connection the
secondary still accepts, and land on its disk — after a new link's resync copied those
regions, if nothing stops them. Only the secondary can cut its end of the connection.
"""

from __future__ import annotations

import aiohttp

from pairvol.errors import PairvolError

# a relink is a process kill, a drain and a daemon start (well under a second); the caller
# holds its replica lock meanwhile, so a peer that does not answer (partitioned) is given up soon
RELINK_TIMEOUT_S = 5.0


class PeerApiError(PairvolError):
    """The peer's agent could not be asked, or refused; the message says which."""


async def relink(address: str, token: str | None, epoch: int, timeout_s: float = RELINK_TIMEOUT_S) -> str | None:
    """``POST /v1/relink {"epoch"}`` on the peer's agent at ``address`` (host:port); returns
    once the peer says no write of an earlier connection can reach its disk any more, with
    the peer's new link serial (``replication.linkSerial`` of its answer; None from an agent
    that has none): a cut that names it is refused once the peer is relinked again
    (docs/correctness.md S5)."""
    url = f"http://{address}/v1/relink"
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.post(url, json={"epoch": epoch}, headers=headers) as resp,
        ):
            try:
                answer = await resp.json(content_type=None)
            except ValueError:
                answer = None
            if resp.status == 200:
                return _link_serial(answer)
            error = answer.get("error") if isinstance(answer, dict) else await resp.text()
            raise PeerApiError(
                f"the peer's agent at {address} refused to end its replication connections ({resp.status}): {error}"
            )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise PeerApiError(f"cannot ask the peer's agent at {address} to end its replication connections: "
                           f"{type(exc).__name__}: {exc}") from exc


def _link_serial(answer: object) -> str | None:
    """The serial in a relink's answer (the peer's status), or None if it names none."""
    replication = answer.get("replication") if isinstance(answer, dict) else None
    serial = replication.get("linkSerial") if isinstance(replication, dict) else None
    return serial if isinstance(serial, str) and serial else None
