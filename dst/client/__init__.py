"""The client side: ``open_remote`` gives a block layer backed by a volume on a dst server."""

from __future__ import annotations

from dst.client.commands import RemoteConfig
from dst.client.remote import RemoteVolume
from dst.client.supervisor import open_remote

__all__ = ["RemoteConfig", "RemoteVolume", "open_remote"]
