"""dst.wire -- the sans-IO wire protocol: frames, messages, connection state.

No trio, no sockets, no clock here (``dst/wire/ruff.toml`` enforces it): the
Trio peers in ``dst.client`` and ``dst.server`` read and write the bytes and
hand them to this package.  ``proto/PROTOCOL.md`` is the language-neutral
reference; ``proto/vectors/`` holds golden frames the tests compare byte for
byte.

- :mod:`dst.wire.messages` -- the message dataclasses, types, flags, errnos.
- :mod:`dst.wire.rules` -- what a well-formed message is; every bound.
- :mod:`dst.wire.codec` -- frames to messages and back (the only msgpack user).
- :mod:`dst.wire.connection` -- which message may travel which way, when.
"""

from __future__ import annotations

from dst.wire.codec import (
    FRAME_VERSION,
    HEADER_SIZE,
    MAGIC,
    MAX_META_LEN,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    FramePrefix,
    check_data,
    data_crc,
    encode_frame,
    parse_meta,
    parse_prefix,
)
from dst.wire.connection import (
    SUPPORTED_VERSIONS,
    Connection,
    ConnState,
    Negotiated,
    choose_version,
)
from dst.wire.messages import (
    MSG_TYPE_OF,
    REQUEST_TYPES,
    Attach,
    Attached,
    BadRequest,
    Errno,
    FlushRequest,
    FrameFlags,
    Goodbye,
    Hello,
    Message,
    MsgType,
    Pages,
    Ping,
    Pong,
    ReadRequest,
    Reply,
    Request,
    TrimRequest,
    Welcome,
    WriteRequest,
    WriteZeroesRequest,
)
from dst.wire.rules import (
    ALLOWED_FLAGS,
    HELLO_ROLES,
    LIMIT_KEYS,
    MAX_DATA_LEN,
    MAX_INFLIGHT_CAP,
    MAX_MESSAGE_LEN,
    MAX_NODE_ID_LEN,
    MAX_PAGE_RUNS,
    MAX_PAGE_SIZE,
    MAX_VOLUME_NAME_LEN,
    MIN_PAGE_SIZE,
    WELCOME_ROLES,
    validate,
)

__all__ = [
    "ALLOWED_FLAGS",
    "FRAME_VERSION",
    "HEADER_SIZE",
    "HELLO_ROLES",
    "LIMIT_KEYS",
    "MAGIC",
    "MAX_DATA_LEN",
    "MAX_INFLIGHT_CAP",
    "MAX_MESSAGE_LEN",
    "MAX_META_LEN",
    "MAX_NODE_ID_LEN",
    "MAX_PAGE_RUNS",
    "MAX_PAGE_SIZE",
    "MAX_VOLUME_NAME_LEN",
    "MIN_PAGE_SIZE",
    "MSG_TYPE_OF",
    "PROTOCOL_VERSION",
    "REQUEST_TYPES",
    "SUPPORTED_VERSIONS",
    "WELCOME_ROLES",
    "Attach",
    "Attached",
    "BadRequest",
    "ConnState",
    "Connection",
    "Errno",
    "FlushRequest",
    "Frame",
    "FrameDecoder",
    "FrameFlags",
    "FramePrefix",
    "Goodbye",
    "Hello",
    "Message",
    "MsgType",
    "Negotiated",
    "Pages",
    "Ping",
    "Pong",
    "ReadRequest",
    "Reply",
    "Request",
    "TrimRequest",
    "Welcome",
    "WriteRequest",
    "WriteZeroesRequest",
    "check_data",
    "choose_version",
    "data_crc",
    "encode_frame",
    "parse_meta",
    "parse_prefix",
    "validate",
]
