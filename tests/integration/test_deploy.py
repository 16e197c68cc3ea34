"""deploy/: the example configs and systemd units cannot rot.

- every example TOML goes through the real parser (``--config``), and the three files agree
  with each other (peers, the bridge's server list);
- the units pass ``systemd-analyze verify`` (present on this machine; where it is not, the
  structural check below still runs);
- the three-host layout runs on loopback from the same files, rewritten only in addresses,
  paths and volume size, with mutual TLS from ``dst certs`` as deploy/README.md sets it up,
  and the README's rolling upgrade (restart the secondary; fail over; the old primary
  rejoins as secondary) keeps I/O flowing with no acknowledged write lost.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import trio

from dst.admin import fetch_status
from dst.config import apply_config
from dst.net.endpoints import Address
from dst.options import build_parser
from dst.security.tls import TlsConfig
from tests.integration.harness import DstProcess, free_port
from tests.integration.nbdtools import run

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "deploy" / "examples"
UNITS = ROOT / "deploy" / "systemd"
DST = [sys.executable, "-m", "dst"]
LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) dst[.\w]* \S"
)


def load(name: str) -> dict[str, dict[str, object]]:
    with open(EXAMPLES / name, "rb") as f:
        return tomllib.load(f)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_every_example_parses_with_the_real_parser(path: Path) -> None:
    with open(path, "rb") as f:
        tables = tomllib.load(f)
    assert tables, path
    for command in tables:
        parser = build_parser()
        args = parser.parse_args(apply_config(parser, [command, "--config", str(path)]))
        assert args.command == command
        assert args.tls is not None, "the examples use TLS"
        assert args.metrics is not None


def test_the_three_examples_describe_one_layout() -> None:
    a, b, bridge = load("a.toml")["serve"], load("b.toml")["serve"], load("bridge.toml")["nbd"]
    assert (a["role"], b["role"]) == ("primary", "secondary")
    assert a["peer"] == b["listen"] and b["peer"] == a["listen"]
    assert a["volume"] == b["volume"]
    assert bridge["server"] == [a["listen"], b["listen"]]
    assert [bridge["volume"]] == [v.split("=")[0] for v in a["volume"]]  # type: ignore[attr-defined]
    assert len({a["tls"], b["tls"], bridge["tls"]}) == 3


def test_units_name_the_config_and_sandbox_the_service() -> None:
    for unit, command in (("dst-server@.service", "serve"), ("dst-nbd@.service", "nbd")):
        cp = configparser.ConfigParser(interpolation=None, strict=True)
        cp.optionxform = str  # type: ignore[assignment,method-assign]
        cp.read(UNITS / unit)
        service = cp["Service"]
        assert service["ExecStart"] == f"/usr/local/bin/dst {command} --config /etc/dst/%i.toml"
        for key, value in {
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "ProtectHome": "yes",
            "PrivateTmp": "yes",
            "CapabilityBoundingSet": "",
            "User": "dst",
        }.items():
            assert service[key] == value, (unit, key)
        assert cp["Install"]["WantedBy"] == "multi-user.target"
    server = configparser.ConfigParser(interpolation=None)
    server.read(UNITS / "dst-server@.service")
    # the data directory of a.toml is the one path the server may write
    assert server["Service"]["ReadWritePaths"] == "/var/lib/dst/%i"
    assert load("a.toml")["serve"]["data"] == "/var/lib/dst/a"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    dst = shutil.which("dst") or "/bin/true"  # verify checks that ExecStart is executable
    names = []
    for unit, instance in (("dst-server@.service", "a"), ("dst-nbd@.service", "bridge")):
        text = (UNITS / unit).read_text().replace("/usr/local/bin/dst", dst)
        name = unit.replace("@", f"@{instance}")
        (tmp_path / name).write_text(text)
        names.append(str(tmp_path / name))
    out = subprocess.run(
        ["systemd-analyze", "verify", *names], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    # unknown keys and bad values are only warnings: any line about our files is a failure
    assert str(tmp_path) not in out.stderr, out.stderr
    assert "dst-" not in out.stderr, out.stderr


# --- the layout on loopback ------------------------------------------------------------------


class Layout:
    """deploy/examples rewritten to loopback: addresses, paths and the volume size."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.pki = tmp_path / "pki"
        self.port = {host: free_port() for host in ("a", "b", "nbd", "ma", "mb", "mc")}
        self.address = {h: Address("127.0.0.1", p) for h, p in self.port.items()}
        self.replace = {
            "10.0.0.1:7410": str(self.address["a"]),
            "10.0.0.2:7410": str(self.address["b"]),
            "127.0.0.1:10809": str(self.address["nbd"]),
            "10.0.0.1:9410": str(self.address["ma"]),
            "10.0.0.2:9410": str(self.address["mb"]),
            "10.0.0.3:9410": str(self.address["mc"]),
            "/var/lib/dst/": f"{tmp_path}/data/",
            "/etc/dst/pki/": f"{self.pki}/",
            "vol0=100G": "vol0=32M",
        }
        for name in ("a", "b", "bridge"):
            text = (EXAMPLES / f"{name}.toml").read_text()
            for old, new in self.replace.items():
                text = text.replace(old, new)
            settings = [line for line in text.splitlines() if not line.startswith("#")]
            assert "10.0.0." not in "\n".join(settings)
            self.config(name).write_text(text)
        self.uri = f"nbds://{self.address['nbd']}/vol0?tls-certificates={self.pki / 'app'}"

    def config(self, name: str) -> Path:
        return self.dir / f"{name}.toml"

    def process(self, name: str) -> DstProcess:
        command = "nbd" if name == "bridge" else "serve"
        address = self.address["nbd" if name == "bridge" else name]
        argv = [command, "--config", str(self.config(name))]
        return DstProcess(argv, address, self.dir / f"{name}.log")

    def swap_roles(self) -> None:
        """After a failover: a.toml says secondary, b.toml primary (deploy/README.md)."""
        for name in ("a", "b"):
            text = self.config(name).read_text()
            old, new = ("primary", "secondary") if name == "a" else ("secondary", "primary")
            self.config(name).write_text(text.replace(f'role = "{old}"', f'role = "{new}"'))


@contextmanager
def started(*procs: DstProcess) -> Iterator[None]:
    with ExitStack() as stack:
        for proc in procs:
            stack.callback(proc.stop)
        for proc in procs:
            proc.start()
        yield


async def dst(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return await run([*DST, *args], check=check)


async def wait_in_sync(address: Address, tls: TlsConfig, role: str) -> None:
    with trio.fail_after(120):
        while True:
            try:
                doc = await fetch_status(address, tls)
            except OSError:
                doc = {}
            vol = doc.get("volumes", {}).get("vol0", {})
            connected = vol.get("connection") == "connected"
            if doc.get("role") == role and connected and vol.get("peer_disk") == "up-to-date":
                return
            await trio.sleep(0.2)


async def nbd_write(layout: Layout, offset: int, data: bytes) -> None:
    src = layout.dir / f"w{offset}.bin"
    src.write_bytes(data)
    connect = f"h.set_uri_allow_local_file(True); h.connect_uri({layout.uri!r})"
    script = f"h.pwrite(open({str(src)!r}, 'rb').read(), {offset}); h.flush()"
    await run(["nbdsh", "-c", connect, "-c", script], debian=True, timeout_s=180)


async def test_three_hosts_on_loopback_and_the_rolling_upgrade(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    pki = str(layout.pki)
    # the TLS walk-through of deploy/README.md
    await dst("certs", "init", pki)
    await dst("certs", "issue", pki, "a", "--role", "replica", "--host", "127.0.0.1")
    await dst("certs", "issue", pki, "b", "--role", "replica", "--host", "127.0.0.1")
    await dst("certs", "issue", pki, "bridge", "--role", "bridge")
    await dst("certs", "issue", pki, "app", "--role", "client")
    await dst("certs", "issue", pki, "admin", "--role", "client")
    tls_b = TlsConfig.load(layout.pki / "b")
    a, b, bridge = layout.process("a"), layout.process("b"), layout.process("bridge")
    image = bytearray(os.urandom(4 << 20)) + bytearray(28 << 20)
    with started(b, a, bridge):
        await wait_in_sync(a.address, tls_b, "primary")
        await nbd_write(layout, 0, bytes(image[: 4 << 20]))

        # dst status --config: the bridge's file names both servers, with its tls directory
        out = await dst("status", "--config", str(layout.config("bridge")))
        table = out.stdout.decode()
        assert f"== {a.address} ==" in table and f"== {b.address} ==" in table
        assert "role primary" in table and "role secondary" in table
        docs = json.loads(
            (await dst("status", "--config", str(layout.config("a")), "--json")).stdout
        )
        assert set(docs) == {str(a.address), str(b.address)}

        # 1. restart (upgrade) the secondary; I/O goes on against the primary meanwhile
        b.kill(signal.SIGTERM)
        image[1 << 20 : 2 << 20] = os.urandom(1 << 20)
        await nbd_write(layout, 1 << 20, bytes(image[1 << 20 : 2 << 20]))
        b.start()
        await wait_in_sync(a.address, tls_b, "primary")

        # 2. fail over: stop the primary, promote the secondary; the bridge follows it
        a.kill(signal.SIGTERM)
        promote = (
            "promote",
            "--server",
            str(b.address),
            "--volume",
            "vol0",
            "--tls",
            f"{pki}/admin",
        )
        with trio.fail_after(30):
            while (await dst(*promote, check=False)).returncode != 0:
                await trio.sleep(0.2)  # EBUSY until B has seen A's connection close
        image[3 << 20 : 4 << 20] = os.urandom(1 << 20)
        await nbd_write(layout, 3 << 20, bytes(image[3 << 20 : 4 << 20]))

        # 3. the old primary, upgraded, rejoins as secondary (roles swapped in the files)
        layout.swap_roles()
        a.start()
        await wait_in_sync(b.address, tls_b, "primary")
        out = await dst(
            "verify", "--server", str(b.address), "--volume", "vol0", "--tls", f"{pki}/b"
        )
        assert "0 differ" in out.stdout.decode()

        back = tmp_path / "back.img"
        await run(["nbdcopy", layout.uri, str(back)], timeout_s=180)
        assert back.read_bytes() == bytes(image)
    # the logs: one event per line, ``TIME LEVEL LOGGER key=value``, and no key material
    secrets = [
        "".join((layout.pki / node / "key.pem").read_text().splitlines()[1:-1])
        for node in ("a", "b", "bridge")
    ]
    for name in ("a", "b", "bridge"):
        lines = (tmp_path / f"{name}.log").read_text().splitlines()
        events = [line for line in lines if not line.startswith("dst nbd: ")]  # its URI
        assert events, name
        for line in events:
            assert LOG_LINE.match(line), line
        assert any("event=" in line for line in events)
        text = "\n".join(lines)
        assert "PRIVATE KEY" not in text and "CERTIFICATE-----" not in text
        assert not any(secret[:40] in text.replace("\n", "") for secret in secrets)


async def test_status_of_a_config_names_unreachable_servers_and_exits_1(tmp_path: Path) -> None:
    a, b = free_port(), free_port()  # nothing listens on either
    cfg = tmp_path / "a.toml"
    cfg.write_text(
        f'[serve]\nlisten = "127.0.0.1:{a}"\npeer = "127.0.0.1:{b}"\ndata = "d"\n'
        'volume = ["vol0=1M"]\nrole = "primary"\ninsecure = true\n'
    )
    out = await dst("status", "--config", str(cfg), check=False)
    assert out.returncode == 1
    text = out.stdout.decode()
    assert f"== 127.0.0.1:{a} ==\nunreachable: " in text and f"== 127.0.0.1:{b} ==" in text
    out = await dst("status", "--config", str(cfg), "--json", check=False)
    docs = json.loads(out.stdout)
    assert set(docs) == {f"127.0.0.1:{a}", f"127.0.0.1:{b}"} and "error" in docs[f"127.0.0.1:{a}"]
