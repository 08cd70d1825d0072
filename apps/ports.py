"""Is a TCP port free to serve on? Asked before a server starts, so a taken port is one clear line.

Why: uvicorn logs "[Errno 98] error while attempting to bind" and exits 1 after the app is built,
which tells a user neither which option to change nor what else holds the port.
"""

from __future__ import annotations

import errno
import socket

__all__ = ["port_problem"]


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be served on (taken, not allowed, no such address), or None when it can."""
    if not 0 <= port <= 65535:
        return f"--port {port}: a port is a number from 0 to 65535"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        return f"--host {host}: not an address of this machine ({error.strerror}); use e.g. 127.0.0.1 or 0.0.0.0"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is not "in use"
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return (f"port {port} on {host} is already in use (another arena or server holds it); "
                        f"pass another --port, or stop what holds it (`lsof -i :{port}` names it)")
            if error.errno == errno.EACCES:
                return f"port {port} needs privileges to bind; pass a --port above 1023"
            return f"cannot serve on {host}:{port}: {error.strerror or error}; pass another --host or --port"
    return None
