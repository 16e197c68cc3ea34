"""The one error hierarchy of dst.

Everything dst raises on purpose derives from :class:`DstError`.  Errors that
cross the wire carry the Linux errno that goes in the reply (as h2's
exceptions carry ``error_code``); messages name the field or limit that was
violated and its value.
"""

from __future__ import annotations

import errno as _errno


class DstError(Exception):
    """Root of every error dst raises deliberately."""


class ConfigError(DstError):
    """An impossible configuration: bad flags, limits that cannot stack."""


class ProtocolError(DstError):
    """A violation of the dst wire protocol.

    ``errno`` is what a reply would carry if the violation is answered
    rather than fatal to the connection.
    """

    def __init__(self, message: str, errno: int = _errno.EPROTO) -> None:
        super().__init__(message)
        self.errno = errno


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes the protocol forbids; the decoder raises this and
    nothing else, whatever the input."""


class BlockError(DstError):
    """A block request failed; ``errno`` goes on the wire unchanged."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno

    @property
    def message(self) -> str:
        """The text alone, as a Reply carries it: the receiver names the errno itself (sending
        ``str(exc)`` made a client's error read "ESTALE: ESTALE: ...")."""
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"{name}: {super().__str__()}"


class FencedError(BlockError):
    """A write carried an epoch older than the volume's: definitely not applied."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.ESTALE, message)
