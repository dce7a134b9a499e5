"""One retrying POST for the two hot HTTP paths (retriever searches, SGLang generation)."""

from __future__ import annotations

import asyncio
import contextlib


class RetriesExhausted(RuntimeError):
    """Every attempt failed with a timeout, a connection error or a 5xx; the message says which."""


async def post_with_retries(session, url: str, payload: dict, *, retries: int, backoff: float, timeout: float,
                            what: str, limiter=None) -> tuple[int, str]:
    """POST ``payload`` as JSON; (status, body) of the first answer below 500.

    Timeouts, connection errors and 5xx are retried ``retries`` times, sleeping ``backoff``
    seconds and doubling; a 4xx is returned at once (asking again will not help). ``limiter``
    (a semaphore) is held only while a request is in flight, never during the backoff.
    """
    import aiohttp  # ~0.15 s to import: on first use, not when `drzero --help` imports this module

    error = "no attempt made"
    for attempt in range(retries + 1):
        if attempt:
            await asyncio.sleep(backoff * 2 ** (attempt - 1))
        try:
            async with limiter or contextlib.nullcontext(), session.post(url, json=payload) as response:
                return_status, body = response.status, await response.text()
        except asyncio.TimeoutError:
            error = f"{what} timed out after {timeout:.0f}s"
            continue
        except aiohttp.ClientError as failure:
            error = f"{what} unreachable at {url} ({type(failure).__name__})"
            continue
        if return_status >= 500:
            error = f"{what} answered {return_status}"
            continue
        return return_status, body
    raise RetriesExhausted(f"{error} (after {retries + 1} attempts)")
