"""The server side: volumes in a data directory, exported over dst frames."""

from __future__ import annotations

from dst.server.server import Server, ServerConfig

__all__ = ["Server", "ServerConfig"]
