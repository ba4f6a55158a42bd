"""TLS and HTTP/2 (ALPN) from granian.toml options, end to end with a throwaway certificate."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Callable
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.fake_upstream import FakeFlagsmith
from tests.support import ProxyProcess, proxy_config, wait_for


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(  # Granian wants PKCS#8
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_tls_and_http2(upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess], tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    proxy = start_proxy(
        proxy_config(upstream.api_url),
        env={"GRANIAN_SSL_CERTIFICATE": str(cert), "GRANIAN_SSL_KEYFILE": str(key)},
    )
    url = f"https://localhost:{proxy.port}"
    with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), http2=True, timeout=10) as client:

        def ready() -> bool:
            try:
                return client.get(url + "/proxy/health/readiness").status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(ready, 30, 0.2), proxy.log()
        response = client.get(url + "/api/v1/flags/", headers={"X-Environment-Key": "env_client_key_1"})
    assert response.status_code == 200
    assert response.http_version == "HTTP/2"
    assert len(response.json()) == 19
