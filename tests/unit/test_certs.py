"""Unit tests for dst.security.certs (the CA and ``dst certs``) and for reading roles back
(dst.security.tls without sockets: TlsConfig, the contexts, peer_role on decoded certs)."""

from __future__ import annotations

import errno
import ipaddress
import re
import ssl
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dst.errors import ConfigError, ProtocolError
from dst.security.certs import (
    ROLES,
    certificate_role,
    certs_main,
    init_ca,
    issue,
)
from dst.security.tls import (
    TlsConfig,
    client_context,
    own_role,
    peer_role,
    require_peer_role,
    server_context,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    init_ca(directory)
    return directory


# --- init_ca ---------------------------------------------------------------------------------


def test_init_ca_writes_cert_and_private_key(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "ca"
    ca_pem = init_ca(directory, name="test-ca", days=10)
    assert ca_pem == directory / "ca.pem"
    assert mode(directory) == 0o700
    assert mode(directory / "ca.key") == 0o600
    assert b"PRIVATE KEY" in (directory / "ca.key").read_bytes()
    cert = load_cert(ca_pem)
    assert cert.subject.rfc4514_string() == "CN=test-ca"
    assert cert.issuer == cert.subject
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca
    assert constraints.path_length == 0
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 10 <= lifetime.days <= 11


def test_init_ca_in_existing_empty_directory(tmp_path: Path) -> None:
    assert init_ca(tmp_path) == tmp_path / "ca.pem"
    assert mode(tmp_path / "ca.key") == 0o600


def test_init_ca_refuses_to_overwrite(ca_dir: Path) -> None:
    before = (ca_dir / "ca.pem").read_bytes(), (ca_dir / "ca.key").read_bytes()
    with pytest.raises(ConfigError, match=r"refusing to overwrite .*ca\.pem"):
        init_ca(ca_dir)
    assert ((ca_dir / "ca.pem").read_bytes(), (ca_dir / "ca.key").read_bytes()) == before


def test_init_ca_refuses_when_only_the_key_is_left(ca_dir: Path) -> None:
    (ca_dir / "ca.pem").unlink()
    with pytest.raises(ConfigError, match=r"ca\.key"):
        init_ca(ca_dir)


@pytest.mark.parametrize("days", [0, -1])
def test_init_ca_rejects_bad_days(tmp_path: Path, days: int) -> None:
    with pytest.raises(ConfigError, match=f"days {days}"):
        init_ca(tmp_path / "ca", days=days)
    assert not (tmp_path / "ca").exists()


# --- issue -----------------------------------------------------------------------------------


def test_issue_writes_self_contained_node_directory(ca_dir: Path) -> None:
    node = issue(ca_dir, "r1", "replica")
    assert node == ca_dir / "r1"
    names = sorted(p.name for p in node.iterdir() if not p.is_symlink())
    assert names == ["ca.pem", "cert.pem", "key.pem"]
    links = {p.name: p.readlink().name for p in node.iterdir() if p.is_symlink()}
    assert links == {
        "ca-cert.pem": "ca.pem",
        "client-cert.pem": "cert.pem",
        "client-key.pem": "key.pem",
        "server-cert.pem": "cert.pem",
        "server-key.pem": "key.pem",
    }
    assert mode(node) == 0o700
    assert mode(node / "key.pem") == 0o600
    assert mode(node / "cert.pem") == 0o644
    assert (node / "ca.pem").read_bytes() == (ca_dir / "ca.pem").read_bytes()
    assert not [p for p in ca_dir.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.parametrize("role", ROLES)
def test_issue_puts_role_in_ou_and_san(ca_dir: Path, role: str) -> None:
    cert = load_cert(issue(ca_dir, f"node-{role}", role) / "cert.pem")
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert [a.value for a in ous] == [role]
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [
        f"node-{role}"
    ]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"dst:role:{role}"]
    assert certificate_role(cert) == role


def test_issue_sans_eku_and_signature(ca_dir: Path) -> None:
    node = issue(ca_dir, "Bridge-7", "bridge", hosts=["10.0.0.7", "nbd.example.org", "[fd00::7]"])
    cert = load_cert(node / "cert.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["bridge-7", "localhost", "nbd.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("fd00::7"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(load_cert(ca_dir / "ca.pem"))  # raises if not


def test_issue_duplicate_hosts_appear_once(ca_dir: Path) -> None:
    node = issue(ca_dir, "r1", "replica", hosts=["127.0.0.1", "r1", "x", "x"])
    cert = load_cert(node / "cert.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["r1", "localhost", "x"]
    assert len(san.get_values_for_type(x509.IPAddress)) == 2


@pytest.mark.parametrize("role", ["", "admin", "Replica", "replica "])
def test_issue_bad_role_is_named(ca_dir: Path, role: str) -> None:
    message = f"role {role!r} is not one of client, bridge, replica"
    with pytest.raises(ConfigError, match=re.escape(message)):
        issue(ca_dir, "n1", role)
    assert not (ca_dir / "n1").exists()


@pytest.mark.parametrize("name", ["", "a/b", "/abs", "..", ".", ".hidden", "a\\b", "a b", "x" * 64])
def test_issue_bad_name_is_named(ca_dir: Path, name: str) -> None:
    before = sorted(ca_dir.iterdir())
    with pytest.raises(ConfigError) as info:
        issue(ca_dir, name, "client")
    assert repr(name) in str(info.value)
    assert sorted(ca_dir.iterdir()) == before


@pytest.mark.parametrize("host", ["", "bad host", "a..b", "-x.example", "a/b"])
def test_issue_bad_host_is_named(ca_dir: Path, host: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"host {host!r}")):
        issue(ca_dir, "n1", "client", hosts=[host])
    assert not (ca_dir / "n1").exists()


def test_issue_without_ca_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ca\.pem does not exist"):
        issue(tmp_path, "n1", "client")


def test_issue_refuses_to_overwrite_node(ca_dir: Path) -> None:
    node = issue(ca_dir, "c1", "client")
    key = (node / "key.pem").read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite existing node directory"):
        issue(ca_dir, "c1", "replica")
    assert (node / "key.pem").read_bytes() == key


def test_issue_validity_is_capped_by_the_ca(tmp_path: Path) -> None:
    init_ca(tmp_path, days=30)
    ca = load_cert(tmp_path / "ca.pem")
    cert = load_cert(issue(tmp_path, "c1", "client", days=825) / "cert.pem")
    assert cert.not_valid_after_utc == ca.not_valid_after_utc


# --- dst certs -------------------------------------------------------------------------------


def test_certs_main_init_and_issue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "pki"
    assert certs_main(["init", str(directory)]) == 0
    assert f"wrote {directory / 'ca.pem'}" in capsys.readouterr().out
    argv = ["issue", str(directory), "r1", "--role", "replica", "--host", "10.1.2.3"]
    assert certs_main(argv) == 0
    out = capsys.readouterr().out
    assert f"wrote {directory / 'r1' / 'key.pem'}" in out
    assert f"--tls {directory / 'r1'}" in out
    assert own_role(TlsConfig.load(directory / "r1")) == "replica"


def test_certs_main_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert certs_main(["init", str(tmp_path)]) == 0
    capsys.readouterr()
    assert certs_main(["init", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dst certs: error: refusing to overwrite")
    assert certs_main(["issue", str(tmp_path), "a/b", "--role", "client"]) == 2
    assert "'a/b'" in capsys.readouterr().err
    assert certs_main(["issue", str(tmp_path / "nothing"), "n1", "--role", "client"]) == 2
    assert "ca.pem does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["issue", "DIR", "n1"],  # --role is required
        ["issue", "DIR", "n1", "--role", "admin"],
        ["init"],
        ["frobnicate"],
        [],
    ],
)
def test_certs_main_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        certs_main(argv)
    assert info.value.code == 2
    assert "usage: dst certs" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["init", "--help"], ["issue", "-h"]])
def test_certs_main_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        certs_main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dst certs")
    if argv[0] == "issue":
        assert "--role {client,bridge,replica}" in out


# --- TlsConfig, contexts and own_role --------------------------------------------------------


def test_tls_config_load_names_the_missing_file(ca_dir: Path) -> None:
    node = issue(ca_dir, "c1", "client")
    assert TlsConfig.load(node) == TlsConfig(node)
    (node / "key.pem").unlink()
    with pytest.raises(ConfigError, match=r"c1/key\.pem is missing"):
        TlsConfig.load(node)
    with pytest.raises(ConfigError, match="nowhere"):
        TlsConfig.load(ca_dir / "nowhere")


def test_contexts_are_tls13_mutual(ca_dir: Path) -> None:
    cfg = TlsConfig.load(issue(ca_dir, "r1", "replica"))
    server = server_context(cfg)
    client = client_context(cfg)
    for ctx in (server, client):
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version is ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert not client.check_hostname


def test_context_with_mismatched_key_is_config_error(ca_dir: Path) -> None:
    a = issue(ca_dir, "a", "client")
    b = issue(ca_dir, "b", "client")
    (a / "key.pem").write_bytes((b / "key.pem").read_bytes())
    with pytest.raises(ConfigError, match=r"a/cert\.pem"):
        client_context(TlsConfig.load(a))


def test_own_role(ca_dir: Path, tmp_path: Path) -> None:
    for role in ROLES:
        assert own_role(TlsConfig.load(issue(ca_dir, role, role))) == role
    other = tmp_path / "other"
    init_ca(other)
    stray = issue(other, "x", "bridge")
    (stray / "ca.pem").write_bytes((ca_dir / "ca.pem").read_bytes())
    with pytest.raises(ConfigError, match="is not signed by"):
        own_role(TlsConfig.load(stray))


# --- peer_role on decoded certificates -------------------------------------------------------


class FakePeer:
    """Stands for ssl.SSLObject / trio.SSLStream: only getpeercert() is used."""

    def __init__(self, cert: Any) -> None:
        self.cert = cert

    def getpeercert(self) -> Any:
        return self.cert


def decoded(ous: list[str], uris: list[str]) -> dict[str, Any]:
    """The shape ssl.SSLObject.getpeercert() returns."""
    subject = tuple((("organizationalUnitName", ou),) for ou in ous)
    subject += ((("commonName", "n1"),),)
    return {
        "subject": subject,
        "subjectAltName": (("DNS", "n1"), *(("URI", u) for u in uris), ("IP Address", "127.0.0.1")),
    }


@pytest.mark.parametrize("role", ROLES)
def test_peer_role_reads_consistent_certificate(role: str) -> None:
    peer = FakePeer(decoded([role], [f"dst:role:{role}"]))
    assert peer_role(peer) == role
    assert require_peer_role(peer, ROLES) == role


@pytest.mark.parametrize(
    ("cert", "message"),
    [
        (None, "no verified certificate"),
        ({}, "no verified certificate"),
        (b"\x30\x00", "not decoded"),
        (decoded(["replica"], []), "no SAN URI"),
        (decoded([], ["dst:role:replica"]), "does not agree"),
        (decoded(["client"], ["dst:role:replica"]), "does not agree"),
        (decoded(["replica", "client"], ["dst:role:replica"]), "does not agree"),
        (decoded(["admin"], ["dst:role:admin"]), "'admin' is not one of"),
        (decoded(["replica"], ["dst:role:replica", "dst:role:client"]), "2 role URIs"),
        (decoded(["replica"], ["https://example.org/"]), "no SAN URI"),
    ],
)
def test_peer_role_refuses_absent_or_inconsistent(cert: Any, message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as info:
        peer_role(FakePeer(cert))
    assert info.value.errno == errno.EPERM


def test_require_peer_role_refuses_other_roles() -> None:
    peer = FakePeer(decoded(["client"], ["dst:role:client"]))
    with pytest.raises(ProtocolError, match="'client' is not allowed here") as info:
        require_peer_role(peer, {"replica"})
    assert info.value.errno == errno.EPERM
