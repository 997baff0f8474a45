"""Whether the server can listen where it is told, asked before it loads anything: a port
in use is reported at once, in one line that says what to do, instead of after the model
has loaded (the API's port opens only once the server is ready)."""

from __future__ import annotations

import errno
import socket

from batchserve.errors import ConfigError


def check_free(host: str, port: int, flag: str = "--port") -> None:
    """ConfigError, naming the address and the way out, when ``host:port`` cannot be
    listened on now (port 0 always can: the kernel picks one)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"cannot listen on {host}: {e.strerror}") from e
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted listens
        try:
            probe.bind(address)
        except OSError as e:
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            way_out = f"pass {flag} N, or {flag} 0 for any free port"
            if flag != "--port":
                way_out = f"pass another {flag}"
            in_use = e.errno == errno.EADDRINUSE
            reason = "is in use" if in_use else f"cannot be listened on ({e.strerror})"
            raise ConfigError(f"{shown} {reason}: {way_out}") from e
