"""A small certificate authority for dst peers, and ``dst certs``.

dst peers authenticate each other with mutual TLS 1.3 (see :mod:`dst.security.tls`). Identity
is not a host name -- peers are reached by whatever address works -- but the pair (our CA, a
role). The role is one of :data:`ROLES` and is written into every node certificate twice, as the
Subject OU and as a SAN URI ``dst:role:<role>``; a reader demands that both are present and
agree, so a certificate made for some other purpose by the same CA cannot pass for a dst peer
by accident.

Layout on disk::

    DIR/ca.pem, DIR/ca.key            made by ``dst certs init DIR``   (DIR 0700, key 0600)
    DIR/NAME/{ca.pem,cert.pem,key.pem}  made by ``dst certs issue DIR NAME --role ROLE``

``DIR/NAME`` is self-contained: the operator copies it to the host and passes ``--tls DIR/NAME``.
Keys are ECDSA P-256: small, and fast to make and to handshake with.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dst.errors import ConfigError

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CERT_FILE",
    "KEY_FILE",
    "ROLES",
    "ROLE_URI_PREFIX",
    "certs_main",
    "init_ca",
    "issue",
    "role_from_names",
]

ROLES = ("client", "bridge", "replica")
ROLE_URI_PREFIX = "dst:role:"

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
#: libnbd's and nbdkit's file names, as symlinks to ours (both sides: any node may be either).
LIBNBD_ALIASES = {
    "ca-cert.pem": CA_CERT_FILE,
    "client-cert.pem": CERT_FILE,
    "client-key.pem": KEY_FILE,
    "server-cert.pem": CERT_FILE,
    "server-key.pem": KEY_FILE,
}

# Certificates start a little in the past so that a peer whose clock lags ours by a few
# minutes does not reject a certificate issued a moment ago.
_BACKDATE = datetime.timedelta(minutes=5)

# A node name becomes a directory name and a DNS SAN, so it must be both: one DNS-ish token,
# no path separators, no leading dot (".", ".." and hidden directories are out).
_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,61}[A-Za-z0-9])?")
_DNS_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_DNS_NAME_MAX_CHARS = 253

_FILE_MODE = 0o644
_KEY_MODE = 0o600
_DIR_MODE = 0o700


# --- role names ------------------------------------------------------------------------------


def role_from_names(ous: Sequence[str], uris: Sequence[str]) -> str:
    """The role that a certificate's Subject OUs and SAN URIs agree on.

    Exactly one ``dst:role:`` URI naming a known role is required, and the Subject must carry
    exactly one OU, equal to it. Raises ValueError saying what is wrong; callers turn that into
    the error of their side (ProtocolError for a peer, ConfigError for our own certificate).
    """
    role_uris = [u for u in uris if u.startswith(ROLE_URI_PREFIX)]
    if not role_uris:
        raise ValueError(f"certificate has no SAN URI {ROLE_URI_PREFIX}<role>")
    if len(role_uris) > 1:
        raise ValueError(f"certificate has {len(role_uris)} role URIs: {role_uris}")
    role = role_uris[0][len(ROLE_URI_PREFIX) :]
    if role not in ROLES:
        raise ValueError(f"certificate role {role!r} is not one of {', '.join(ROLES)}")
    if list(ous) != [role]:
        raise ValueError(f"certificate Subject OU {list(ous)} does not agree with role {role!r}")
    return role


def certificate_role(cert: x509.Certificate) -> str:
    """:func:`role_from_names` applied to a parsed certificate (ValueError if inconsistent)."""
    ou_attrs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    ous = [str(attr.value) for attr in ou_attrs]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        uris: list[str] = []
    else:
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return role_from_names(ous, uris)


# --- validation ------------------------------------------------------------------------------


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return role


def _check_node_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"node name {name!r} is not valid: it becomes a directory and a DNS name, so use "
            "1-63 letters, digits, '.' or '-', starting and ending with a letter or digit"
        )
    return name


def _check_days(days: int) -> int:
    if days < 1:
        raise ConfigError(f"days {days} must be at least 1")
    return days


def _host_name(host: str) -> x509.GeneralName:
    """An IP address or DNS name for the SAN; ConfigError naming ``host`` if it is neither."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return x509.IPAddress(ipaddress.ip_address(bare))
    except ValueError:
        pass
    labels = host.split(".")
    if len(host) > _DNS_NAME_MAX_CHARS or not all(_DNS_LABEL_RE.fullmatch(lb) for lb in labels):
        raise ConfigError(f"host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host.lower())


# --- files -----------------------------------------------------------------------------------


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with exactly ``mode`` (whatever the umask); never overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(fd)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path = directory / CA_CERT_FILE
    key_path = directory / CA_KEY_FILE
    for path in (cert_path, key_path):
        if not path.is_file():
            raise ConfigError(f"CA file {path} does not exist (run `dst certs init {directory}`)")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as e:
        raise ConfigError(f"CA certificate {cert_path} is not a PEM certificate: {e}") from e
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"CA key {key_path} is not an unencrypted PEM key: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"CA key {key_path} is not an ECDSA key")
    if key.public_key() != cert.public_key():
        raise ConfigError(f"CA key {key_path} does not belong to {cert_path}")
    return cert, key


# --- the CA and node certificates ------------------------------------------------------------


def _now() -> datetime.datetime:
    # Wall time is right here: certificate validity is wall-clock by definition.
    return datetime.datetime.now(datetime.UTC)


def init_ca(directory: Path, *, name: str = "dst-ca", days: int = 3650) -> Path:
    """Make a new CA in ``directory``: ``ca.pem`` and ``ca.key`` (0600); returns ``ca.pem``.

    ``directory`` is created 0700 if missing. An existing CA is never overwritten
    (ConfigError): every certificate it issued would silently stop working.
    """
    directory = Path(directory)
    if not name or "\n" in name:
        raise ConfigError(f"CA name {name!r} must be one non-empty line")
    _check_days(days)
    cert_path = directory / CA_CERT_FILE
    key_path = directory / CA_KEY_FILE
    for path in (cert_path, key_path):
        if path.exists():
            raise ConfigError(f"refusing to overwrite existing CA file {path}")
    if not directory.exists():
        directory.mkdir(mode=_DIR_MODE, parents=True)
        directory.chmod(_DIR_MODE)  # mkdir's mode is filtered by the umask
    elif not directory.is_dir():
        raise ConfigError(f"CA directory {directory} exists and is not a directory")

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        # path_length=0: this CA signs node certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    try:
        _write_new(key_path, _key_pem(key), _KEY_MODE)
    except FileExistsError as e:
        raise ConfigError(f"refusing to overwrite existing CA file {key_path}") from e
    try:
        _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), _FILE_MODE)
    except BaseException as e:
        key_path.unlink()  # a key without its certificate would block the next init
        if isinstance(e, FileExistsError):
            raise ConfigError(f"refusing to overwrite existing CA file {cert_path}") from e
        raise
    return cert_path


def issue(
    directory: Path,
    name: str,
    role: str,
    *,
    hosts: Sequence[str] = (),
    days: int = 825,
) -> Path:
    """Sign a certificate for node ``name`` with ``role`` by the CA in ``directory``.

    Writes ``directory/name/{ca.pem,cert.pem,key.pem}`` (key 0600, directory 0700) and returns
    that directory. SANs: the role URI, DNS ``name`` and ``localhost``, IP 127.0.0.1 and ::1,
    and each of ``hosts``. An existing node directory is not overwritten (ConfigError); delete
    it to reissue. Validity is capped at the CA's own.
    """
    directory = Path(directory)
    _check_node_name(name)
    _check_role(role)
    _check_days(days)
    ca_cert, ca_key = _load_ca(directory)
    target = directory / name
    if target.exists() or target.is_symlink():
        raise ConfigError(f"refusing to overwrite existing node directory {target}")

    alt_names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(ROLE_URI_PREFIX + role),
        x509.DNSName(name.lower()),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    for host in hosts:
        general_name = _host_name(host)
        if general_name not in alt_names:
            alt_names.append(general_name)

    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # Both: every dst peer is a TLS server to some peers and a client of others.
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    # Build the directory under a temporary name and rename it into place, so a failure
    # halfway never leaves a node directory with a key but no certificate.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=directory))  # created 0700
    try:
        pem = serialization.Encoding.PEM
        _write_new(staging / CA_CERT_FILE, ca_cert.public_bytes(pem), _FILE_MODE)
        _write_new(staging / CERT_FILE, cert.public_bytes(pem), _FILE_MODE)
        _write_new(staging / KEY_FILE, _key_pem(key), _KEY_MODE)
        # libnbd/nbdkit look for these names in a --tls-certificates directory, so the same
        # node directory also works for nbdinfo, nbdcopy, qemu and nbdfuse (nbds:// URIs).
        for alias, real in LIBNBD_ALIASES.items():
            (staging / alias).symlink_to(real)
        if target.exists() or target.is_symlink():
            raise ConfigError(f"refusing to overwrite existing node directory {target}")
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


# --- dst certs -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dst certs",
        description="Make the CA and the node certificates for dst's mutual TLS.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{init,issue}")

    p_init = sub.add_parser(
        "init",
        help="create a new CA in DIR",
        description="Create a new CA: DIR/ca.pem and DIR/ca.key (0600). Never overwrites one.",
    )
    p_init.add_argument("directory", metavar="DIR", type=Path)
    p_init.add_argument("--name", default="dst-ca", help="CA common name (default: %(default)s)")
    p_init.add_argument("--days", type=int, default=3650, help="validity (default: %(default)s)")

    p_issue = sub.add_parser(
        "issue",
        help="sign a node certificate with the CA in DIR",
        description=(
            "Sign a certificate for node NAME with the CA in DIR. Writes DIR/NAME/{ca.pem,"
            "cert.pem,key.pem}: copy that directory to the host and pass it as --tls DIR/NAME."
        ),
    )
    p_issue.add_argument("directory", metavar="DIR", type=Path)
    p_issue.add_argument("name", metavar="NAME")
    p_issue.add_argument("--role", required=True, choices=ROLES, help="the peer's role")
    p_issue.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        metavar="H",
        help="extra IP address or DNS name for the SAN (repeatable)",
    )
    p_issue.add_argument("--days", type=int, default=825, help="validity (default: %(default)s)")
    return parser


def certs_main(argv: list[str]) -> int:
    """``dst certs ...``: 0 on success, 2 with a message on stderr on error.

    Usage errors and ``--help`` leave through argparse's SystemExit (2 and 0).
    """
    args = _parser().parse_args(argv)
    try:
        if args.command == "init":
            ca_pem = init_ca(args.directory, name=args.name, days=args.days)
            print(f"wrote {ca_pem}")
            print(f"wrote {ca_pem.parent / CA_KEY_FILE} (keep it secret; it signs every peer)")
        else:
            node = issue(args.directory, args.name, args.role, hosts=args.hosts, days=args.days)
            for file in (CA_CERT_FILE, CERT_FILE, KEY_FILE):
                print(f"wrote {node / file}")
            print(f"role {args.role}: copy {node} to the host and pass --tls {node}")
    except (ConfigError, OSError) as e:
        print(f"dst certs: error: {e}", file=sys.stderr)
        return 2
    return 0
