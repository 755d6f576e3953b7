"""Who may use a ``lorakit serve`` server, and which directories it may load adapters from.

- **API key** (``--api-key`` or ``LORAKIT_API_KEY``): every request but ``GET /health`` must carry
  ``Authorization: Bearer KEY``, as OpenAI's and vLLM's clients send it (``OpenAI(api_key=KEY)``); any other
  request is answered 401 in OpenAI's error shape (``code: invalid_api_key``) before it reaches an endpoint.
  Keys are compared in constant time and never echoed.
- **Adapter roots** (``--adapter-root DIR``, repeatable): a runtime adapter load (``POST /v1/adapters``,
  ``/v1/load_lora_adapter``) may only read a directory inside one of them, after symbolic links and ``..`` are
  resolved; a path outside is answered 403. A relative path is looked up under the roots, in order.
- **Loopback**: runtime loading is off by default on a server that listens beyond the loopback interface, and
  turning it on there requires adapter roots (``lorakit serve`` enforces both).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from starlette.responses import JSONResponse

from lorakit.errors import ConfigError
from lorakit.serve.engine import ServeError
from lorakit.serve.protocol import error_body

#: Paths that answer without a key: a load balancer's or orchestrator's liveness probe.
OPEN_PATHS = frozenset({"/health"})
#: The environment variable ``lorakit serve`` reads the API key from (safer than ``--api-key`` on the command
#: line, which other users of the machine can see in the process list).
API_KEY_ENV = "LORAKIT_API_KEY"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class BearerAuth:
    """ASGI middleware: refuse (401) every HTTP request outside :data:`OPEN_PATHS` without the right
    ``Authorization: Bearer`` token. A plain ASGI wrapper, so streamed responses pass through untouched."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], *, api_key: str) -> None:
        if not isinstance(api_key, str) or not api_key.strip():
            raise ConfigError("api_key must be a non-empty string")
        self.app = app
        self._key = api_key.encode()

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers") or ():
            if name.lower() == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") not in OPEN_PATHS and not self._authorized(scope):
            body = error_body(401, "invalid or missing API key: send the header 'Authorization: Bearer KEY' "
                              "(OpenAI clients: api_key=KEY)", code="invalid_api_key")
            response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class AdapterRoots:
    """The directories runtime adapter loads are confined to.

    Args:
        roots: existing directories; :class:`ConfigError` names one that is not.
    """

    def __init__(self, roots: Sequence[str | os.PathLike[str]]) -> None:
        resolved = []
        for r in roots:
            p = Path(r).expanduser()
            if not p.is_dir():
                raise ConfigError(f"--adapter-root {str(r)!r}: no such directory")
            resolved.append(p.resolve())
        if not resolved:
            raise ConfigError("--adapter-root: give at least one directory")
        self.roots = tuple(resolved)

    def resolve(self, path: str) -> Path:
        """The real location of ``path`` (links resolved), if it lies inside a root.

        Raises:
            ServeError: 403 when it lies outside every root.
        """
        given = Path(path).expanduser()
        candidates = [given] if given.is_absolute() else [root / given for root in self.roots]
        for c in candidates:
            real = c.resolve()  # follows every symbolic link and '..'
            if any(real == root or real.is_relative_to(root) for root in self.roots) and \
                    (real.exists() or c is candidates[-1]):
                return real
        raise ServeError(403, f"adapter path {path[:200]!r} is outside the directories this server loads adapters "
                         "from (its --adapter-root)", code="adapter_path_forbidden")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0]).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


__all__ = ["API_KEY_ENV", "OPEN_PATHS", "AdapterRoots", "BearerAuth", "is_loopback"]
