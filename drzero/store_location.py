"""Where the corpus store is: a local directory (embedded ChromaDB) or a Chroma server's address.

    --db /corpus/chromadb                  the embedded store in that directory
    --db http://chroma.internal:8000       a Chroma server (single node, or Chroma's distributed deployment)
    --db https://chroma.example.org        the same over TLS (port 443 unless named)

``parse_db`` is the one place that tells the two apart; everything that treats ``--db`` as a directory
(the writer's lock, the index-check record, ``--copy-to-local``, the demo world's facts) asks it first.
An address is never taken for a folder: ``Path("http://host:8000")`` would quietly make ``http:/host:8000``.

A server that wants a token gets it from the environment, never from the command line (it would show in
``ps`` and in logs): ``$DRZERO_CHROMA_TOKEN``, else Chroma's own client setting
``$CHROMA_CLIENT_AUTH_CREDENTIALS``, else the server's ``$CHROMA_SERVER_AUTHN_CREDENTIALS`` (compose hands
both containers one environment). It is sent the way Chroma's token client sends it: ``Authorization: Bearer``,
or ``X-Chroma-Token`` when ``$CHROMA_AUTH_TOKEN_TRANSPORT_HEADER`` says so.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from drzero.config import ConfigError

TOKEN_ENV = "DRZERO_CHROMA_TOKEN"
TOKEN_HEADER_ENV = "CHROMA_AUTH_TOKEN_TRANSPORT_HEADER"  # Chroma's: Authorization (default) or X-Chroma-Token
# Chroma's own names, read after ours: the client's credentials, then the server's (one environment for both).
CHROMA_TOKEN_ENVS = ("CHROMA_CLIENT_AUTH_CREDENTIALS", "CHROMA_SERVER_AUTHN_CREDENTIALS")
# What a service child (the retriever a stage starts) must inherit although drzero.services takes them for secrets.
STORE_SECRET_ENVS = (TOKEN_ENV, *CHROMA_TOKEN_ENVS, TOKEN_HEADER_ENV)

SERVER_SCHEMES = {"http": 8000, "https": 443}  # Chroma's own default port for plain http
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class StoreLocation:
    """A local store directory (``path``) or a Chroma server (``url``: scheme, host and port, no trailing slash)."""

    path: Path | None = None
    url: str | None = None

    @property
    def is_server(self) -> bool:
        return self.url is not None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or SERVER_SCHEMES[parts.scheme]

    @property
    def ssl(self) -> bool:
        return urlsplit(self.url).scheme == "https"

    def __str__(self) -> str:
        return self.url if self.url is not None else str(self.path)


def is_server_address(db: str | os.PathLike | StoreLocation) -> bool:
    """Whether ``--db`` names a server (``scheme://...``) rather than a directory."""
    if isinstance(db, StoreLocation):
        return db.is_server
    return isinstance(db, str) and bool(_SCHEME.match(db.strip()))


def parse_db(db: str | os.PathLike | StoreLocation) -> StoreLocation:
    """The store ``--db`` names; ConfigError (one sentence) for an address drzero cannot use."""
    if isinstance(db, StoreLocation):
        return db
    if not is_server_address(db):
        return StoreLocation(path=Path(db))
    text = str(db).strip()
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    example = "e.g. http://127.0.0.1:8000 or https://chroma.example.org"
    if scheme not in SERVER_SCHEMES:
        raise ConfigError(f"--db {text} is an address with scheme {scheme!r}, but a Chroma server is reached over "
                          f"http:// or https:// ({example}); a local store is a directory path.")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"--db {text} has a port that is not a number from 1 to 65535; {example}.") from None
    if not parts.hostname:
        raise ConfigError(f"--db {text} names no host; {example}.")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"--db {text} has a path or query after the host, which a Chroma server does not take; "
                          f"pass only the scheme, host and port ({example}).")
    if parts.username or parts.password:
        raise ConfigError(f"--db {text} carries credentials in the address; pass a token in ${TOKEN_ENV} instead "
                          f"and give --db only the scheme, host and port.")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return StoreLocation(url=f"{scheme}://{host}:{port or SERVER_SCHEMES[scheme]}")


def resolved_db(db: str | os.PathLike) -> Path | str:
    """``--db`` as a stage plan keeps it: a local store's absolute path, or a server's normalized address."""
    location = parse_db(db)
    return location.url if location.is_server else location.path.resolve()


def store_token(environ: dict[str, str] | None = None) -> tuple[str | None, str | None]:
    """(the token to send the Chroma server, the variable it came from); (None, None) when none is set."""
    environ = os.environ if environ is None else environ
    for variable in (TOKEN_ENV, *CHROMA_TOKEN_ENVS):
        if environ.get(variable, "").strip():
            return environ[variable].strip(), variable
    return None, None
