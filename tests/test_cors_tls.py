"""What a browser and the network see: CORS off unless origins are configured, and HTTPS when a
certificate is given to `serai serve`."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from serai.app import create_app
from serai.config import Settings
from serai.testing.processes import free_port, wait_until_ready
from tests.conftest import start_server, stop_server
from tests.support.fake_engine import FakeEngine

CONSOLE = "https://console.example.com"
PREFLIGHT = {"origin": CONSOLE, "access-control-request-method": "POST",
             "access-control-request-headers": "authorization, content-type"}


pytestmark = pytest.mark.usefixtures("no_config")


async def _answers(settings: Settings) -> tuple[httpx.Response, httpx.Response, httpx.Response]:
    """A preflight, a refused call (no key) from the console, and one from another origin."""
    app = create_app(settings, engines=[FakeEngine(name="m")])
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://serai") as http:
        preflight = await http.options("/v1/chat/completions", headers=PREFLIGHT)
        refused = await http.get("/v1/models", headers={"origin": CONSOLE})
        other = await http.get("/v1/models", headers={"origin": "https://evil.example"})
    return preflight, refused, other


async def test_cors_is_off_by_default(tmp_path: Path) -> None:
    preflight, refused, other = await _answers(Settings(data_dir=tmp_path))
    assert preflight.status_code >= 400
    for response in (preflight, refused, other):
        assert not [h for h in response.headers if h.startswith("access-control-")]


async def test_configured_origins_may_call_from_a_browser(tmp_path: Path) -> None:
    preflight, refused, other = await _answers(Settings(data_dir=tmp_path,
                                                        cors_origins=[CONSOLE]))
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == CONSOLE
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in preflight.headers
    # An error answer carries the headers too, so the page can show it
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == CONSOLE
    assert "x-request-id" in refused.headers["access-control-expose-headers"]
    assert "access-control-allow-origin" not in other.headers


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return certfile, keyfile


def test_serve_speaks_https_with_a_certificate(tmp_path: Path) -> None:
    certfile, keyfile = _self_signed(tmp_path)
    port = free_port()
    env = dict(os.environ, SERAI_EMBEDDED="false",  # no_config already set SERAI_CONFIG
               SERAI_TLS_CERTFILE=str(certfile), SERAI_TLS_KEYFILE=str(keyfile))
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "serai", "serve", "--port", str(port),
                                    "--data-dir", str(tmp_path / "d")], stdout=out,
                                   stderr=subprocess.STDOUT, env=env)
    try:
        trusted = ssl.create_default_context(cafile=str(certfile))
        wait_until_ready(process, f"https://127.0.0.1:{port}/health", log, timeout=60,
                         verify=trusted)
        response = httpx.get(f"https://127.0.0.1:{port}/health", verify=trusted)
        assert response.status_code == 200
        with pytest.raises(httpx.HTTPError):  # plain HTTP gets no answer
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        assert f"https://127.0.0.1:{port}" in " ".join(log.read_text().split())
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_tls_needs_both_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls_certfile and tls_keyfile together"):
        Settings(tls_certfile=tmp_path / "cert.pem")


def test_an_admin_port_serves_the_admin_api_and_nothing_else(tmp_path: Path) -> None:
    admin_port = free_port()
    env = {"SERAI_ADMIN_PORT": str(admin_port), "SERAI_EMBEDDED": "false",
           "SERAI_CONFIG": str(tmp_path / "absent.toml")}
    server = start_server(tmp_path / "serai-data", extra_env=env)
    try:
        admin = {"authorization": f"Bearer {server.admin_key}"}
        public, private = server.base_url, f"http://127.0.0.1:{admin_port}"
        hidden = httpx.get(f"{public}/admin/v1/organizations", headers=admin)
        assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "not_found"
        assert httpx.get(f"{public}/v1/models", headers=admin).status_code == 200
        assert httpx.get(f"{private}/admin/v1/organizations", headers=admin).status_code == 200
        model_api = httpx.get(f"{private}/v1/models", headers=admin)
        assert model_api.status_code == 404 and "admin port" in model_api.json()["error"]["message"]
        assert httpx.get(f"{private}/ready").status_code == 200
        # The CLI finds the admin port from the same settings.
        listed = subprocess.run(
            [sys.executable, "-m", "serai", "deployments", "list", "--key", server.admin_key,
             "--data-dir", str(server.data_dir)], capture_output=True, text=True, timeout=60,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("SERAI_")}, **env})
        assert listed.returncode == 0, listed.stderr
    finally:
        stop_server(server)


def test_the_admin_port_must_differ_from_the_port() -> None:
    with pytest.raises(ValueError, match="admin_port"):
        Settings(port=8000, admin_port=8000)
