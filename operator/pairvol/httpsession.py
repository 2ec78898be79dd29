"""One aiohttp session per client object, made on first use.

aiohttp sessions must be created inside the running event loop, so clients cannot make
theirs in ``__init__``; every HTTP client in the package holds a :class:`LazySession`.
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp


class LazySession:
    def __init__(self, make: Callable[[], aiohttp.ClientSession] = aiohttp.ClientSession) -> None:
        self._make = make
        self._session: aiohttp.ClientSession | None = None

    def get(self) -> aiohttp.ClientSession:
        """The session, (re)made if there is none or it was closed."""
        if self._session is None or self._session.closed:
            self._session = self._make()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
