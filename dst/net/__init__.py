"""The Trio side of the wire: framed streams over TCP or TLS, addresses, connecting and listening.

``dst.wire`` is sans-IO; this package is the thin adapter that moves its frames over real
sockets, reading data straight into the caller's buffers and writing header and data with one
``sendmsg``.
"""
