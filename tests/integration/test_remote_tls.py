"""The client and server over mutual TLS 1.3, with the role in the certificate checked."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio

from dst.block import Bio, Op
from dst.client import open_remote
from dst.errors import BlockError
from dst.security.certs import init_ca, issue
from dst.security.tls import TlsConfig
from tests.integration.harness import running_server


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    root = tmp_path / "pki"
    init_ca(root)
    issue(root, "server", "replica")
    issue(root, "app", "client")
    issue(root, "nbd", "bridge")
    other = tmp_path / "other-pki"
    init_ca(other)
    issue(other, "intruder", "client")
    return tmp_path


async def test_tls_round_trip_and_role_checks(pki: Path) -> None:
    server_tls = TlsConfig.load(pki / "pki" / "server")
    async with running_server(pki / "data", tls=server_tls) as server:
        addr = server.listen_address
        assert addr is not None
        for name, role in [("app", "client"), ("nbd", "bridge")]:
            tls = TlsConfig.load(pki / "pki" / name)
            async with open_remote(addr, "vol0", tls=tls, role=role) as vol:
                await vol.submit(Bio.from_buffer(Op.WRITE, 0, b"t" * 4096))
                out = bytearray(4096)
                await vol.submit(Bio.from_buffer(Op.READ, 0, out))
                assert out == b"t" * 4096
        # a client certificate claiming another role in Hello is refused with EPERM
        with pytest.raises(BlockError) as info:
            async with open_remote(
                addr, "vol0", tls=TlsConfig.load(pki / "pki" / "app"), role="replica"
            ):
                pass
        assert info.value.errno == errno.EPERM
        # a certificate from another CA, and plaintext, never get a Welcome
        bad: list[TlsConfig | None] = [TlsConfig.load(pki / "other-pki" / "intruder"), None]
        for bad_tls in bad:
            with pytest.raises((trio.BrokenResourceError, OSError, BlockError)):
                async with open_remote(addr, "vol0", tls=bad_tls):
                    pass
        # only the three authenticated connections ever reached a session
        assert server.stats["connections"] == 3
