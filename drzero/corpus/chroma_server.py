"""Opening a Chroma server as the corpus store (``--db http://host:port``), with one sentence when it fails.

Chroma's own client reports a server it cannot reach as "Could not connect to a Chroma server", and a refused
token as the body of whatever answered (a proxy's HTML, a JSON error); neither names the address or what to
do. When opening fails, the server is asked directly (its heartbeat, then who the token makes us) and the
answer becomes one sentence: not reachable, not a Chroma server, token missing or refused.

The token comes from the environment (drzero.store_location.store_token) and goes through Chroma's own token
client (``chromadb.auth.token_authn.TokenAuthClientProvider``), so it is sent exactly as Chroma's clients send
it. The single-node server that ships with chromadb 1.5 (``chroma run``) checks no token at all; a token matters
to a server behind an authenticating proxy, to Chroma's distributed deployment and to Chroma Cloud.
"""

from __future__ import annotations

import logging
import os

from drzero.store_location import TOKEN_ENV, TOKEN_HEADER_ENV, StoreLocation, store_token

log = logging.getLogger(__name__)

TOKEN_CLIENT = "chromadb.auth.token_authn.TokenAuthClientProvider"
API = "/api/v2"
PROBE_TIMEOUT_S = 10.0


class ServerUnavailable(RuntimeError):
    """The Chroma server could not be opened; the message is one sentence saying why and what to do."""


def server_client(location: StoreLocation):
    """A ``chromadb.HttpClient`` on ``location``, or ServerUnavailable naming the address and what failed."""
    import chromadb  # seconds to import: only opening a store needs it, not `drzero --help`

    # httpx logs every request at INFO: one line per search batch and per ingest write drowns the log
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").getEffectiveLevel()))
    token, source = store_token()
    auth = {}
    if token is not None:
        # a provider the user configured for Chroma (e.g. basic auth) is kept; the token becomes its credentials
        auth = {"chroma_client_auth_provider": os.environ.get("CHROMA_CLIENT_AUTH_PROVIDER") or TOKEN_CLIENT,
                "chroma_client_auth_credentials": token}
    try:
        settings = chromadb.Settings(anonymized_telemetry=False, **auth)
        client = chromadb.HttpClient(host=location.host, port=location.port, ssl=location.ssl, settings=settings)
    except Exception as error:  # noqa: BLE001 — every failure to open becomes the one sentence below
        raise ServerUnavailable(diagnose(location, token, source, error)) from None
    log.info("corpus store: the Chroma server at %s%s", location.url,
             f" (token from ${source})" if source else "")
    return client


def token_headers(token: str | None) -> dict[str, str]:
    """The header Chroma's token client would send for ``token``."""
    if token is None:
        return {}
    if os.environ.get(TOKEN_HEADER_ENV, "").lower() == "x-chroma-token":
        return {"X-Chroma-Token": token}
    return {"Authorization": f"Bearer {token}"}


def diagnose(location: StoreLocation, token: str | None, source: str | None, error: Exception) -> str:
    """Why the Chroma server at ``location`` could not be opened, as one sentence with what to do."""
    import httpx  # chromadb's own HTTP library; imported with it

    url = location.url
    try:
        beat = httpx.get(f"{url}{API}/heartbeat", headers=token_headers(token), timeout=PROBE_TIMEOUT_S)
        refused = beat if beat.status_code in (401, 403) else httpx.get(
            f"{url}{API}/auth/identity", headers=token_headers(token), timeout=PROBE_TIMEOUT_S)
    except httpx.HTTPError as unreachable:
        reason = str(unreachable) or type(unreachable).__name__
        return (f"no Chroma server answers at {url} ({reason}); start one there (e.g. `chroma run --path DIR "
                f"--port {location.port}`) or correct --db.")
    if refused.status_code in (401, 403):
        if token is None:
            return (f"the Chroma server at {url} refused drzero's requests without a token (HTTP "
                    f"{refused.status_code}); set ${TOKEN_ENV} to a token it accepts.")
        return (f"the Chroma server at {url} refused the token from ${source} (HTTP {refused.status_code}); set "
                f"${TOKEN_ENV} to a token it accepts (sent as {', '.join(token_headers(token))}, or set "
                f"${TOKEN_HEADER_ENV}=X-Chroma-Token for servers that read that header).")
    if beat.status_code != 200:
        return (f"{url} answers, but not as a Chroma server (GET {API}/heartbeat gave HTTP {beat.status_code}); "
                f"check the host and port in --db.")
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"could not open the Chroma server at {url}: {first_line}; check --db and the server's log."
