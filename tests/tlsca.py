"""A throw-away certificate authority for tests (``cryptography``), and the HTTPS Control
started from it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common import protocol
from common.certificates import alt_names
from control.app import ControlSettings, create_app
from control.main import _Server
from control.tls import ControlTls
from tests.controlserver import ADMIN_TOKEN, RunningControl

PEM = serialization.Encoding.PEM


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


class TestCa:
    """A CA that signs server certificates for host names and addresses."""

    __test__ = False  # not a pytest class

    def __init__(self, name: str = "kakuremichi test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
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
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def write_ca(self, path: Path) -> Path:
        path.write_bytes(self.cert.public_bytes(PEM))
        return path

    def issue(
        self,
        cert_file: Path,
        key_file: Path,
        names: tuple[str, ...] = ("localhost", "127.0.0.1"),
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> ec.EllipticCurvePrivateKey:
        """Write a server certificate for ``names`` (chain: leaf + CA) and its key."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        alt = alt_names(names)
        now = dt.datetime.now(dt.UTC)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        key_file.write_bytes(_key_pem(key))
        cert_file.write_bytes(leaf.public_bytes(PEM) + self.cert.public_bytes(PEM))
        return key


class HttpsControl(RunningControl):
    """:class:`RunningControl` serving HTTPS from ``cert_file``/``key_file`` (reloaded
    every ``interval`` seconds when they change)."""

    def __init__(
        self,
        db_path: Path,
        cert_file: Path,
        key_file: Path,
        interval: float = 0.1,
        **overrides: Any,
    ) -> None:
        super().__init__(db_path, **overrides)
        self.tls = ControlTls(cert_file, key_file, interval=interval)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/ws"

    async def start(self) -> RunningControl:
        import asyncio

        settings = ControlSettings(
            database_url=f"sqlite+aiosqlite:///{self.db_path}",
            admin_token=self.overrides.pop("admin_token", ADMIN_TOKEN),
            announce=self.announced.append,
            tls=self.tls,
            **self.overrides,
        )
        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            ws_max_size=protocol.MAX_FRAME_BYTES,
            ws_per_message_deflate=False,
            lifespan="on",
        )
        self.server = _Server(config, self.app, self.tls.context)
        self.server.install_signal_handlers = False  # type: ignore[attr-defined]
        self.task = asyncio.get_running_loop().create_task(self.server.serve())
        for _ in range(500):
            if self.server.started:
                return self
            if self.task.done():
                self.task.result()
                raise RuntimeError("control exited during start-up")
            await asyncio.sleep(0.01)
        raise TimeoutError("control did not start")
