"""`fedprune coordinator provision`: credentials, broker ACLs, TLS and signing keys for a fleet.

Writes, under --out:
    ca/ca.crt, ca/ca.key                  the fleet's certificate authority (keep ca.key offline)
    broker/server.crt, server.key         the broker's certificate, for --broker-host names
    broker/passwords                      Mosquitto password file (hashed by `mosquitto_passwd`)
    broker/acl                            per-device topic ACLs (user name = device id)
    broker/fedprune-security.conf         the listener, password_file and acl_file lines to include
    coordinator/coordinator.toml          broker credentials, CA and signing key
    coordinator/signing.key, signing.pub  Ed25519: the coordinator signs tasks, devices verify
    devices/<id>/edge.toml                each device's credentials, CA and the coordinator's key
Passwords are random (secrets.token_urlsafe); nothing is reused between devices.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
import shutil
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from edge_sdk.agent import EdgeConfig
from edge_sdk.protocol.topics import Topics, check_id

COORDINATOR_USER = "fedprune-coordinator"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o600)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificates(out: Path, hosts: list[str]) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedprune fleet CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP256R1())
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=825))
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .sign(ca_key, hashes.SHA256()))
    (out / "ca").mkdir(parents=True, exist_ok=True)
    (out / "ca" / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_private(out / "ca" / "ca.key", _pem_key(ca_key))
    (out / "broker").mkdir(parents=True, exist_ok=True)
    (out / "broker" / "server.crt").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_private(out / "broker" / "server.key", _pem_key(server_key))


def _password_file(path: Path, users: dict[str, str]) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        raise ValueError("mosquitto_passwd is not installed; install mosquitto (apt-get install "
                         "mosquitto) on the machine that provisions the fleet")
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    for user, password in users.items():
        subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)


def acl_text(topics: Topics) -> str:
    root = topics.root
    lines = [f"user {COORDINATOR_USER}", f"topic readwrite {root}/#", "",
             "# every other user is a device whose user name is its id (%u)"]
    lines += [f"pattern write {root}/{kind}/%u" for kind in ("register", "status", "update", "refusal")]
    lines += [f"pattern read {root}/{kind}/%u" for kind in ("task", "ack", "artifact")]
    return "\n".join(lines) + "\n"


def provision(out: str | Path, devices: list[str], broker_url: str, broker_hosts: list[str],
              fleet: str = "default", listener_port: int = 8883) -> dict:
    out = Path(out)
    for device in devices:
        check_id("device id", device)
    if len(set(devices)) != len(devices):
        raise ValueError("device ids must be unique")
    topics = Topics(fleet)
    _certificates(out, broker_hosts)
    passwords = {device: secrets.token_urlsafe(24) for device in devices}
    coordinator_password = secrets.token_urlsafe(24)
    _password_file(out / "broker" / "passwords", {COORDINATOR_USER: coordinator_password, **passwords})
    (out / "broker" / "acl").write_text(acl_text(topics))
    broker_dir = (out / "broker").resolve()
    ca_dir = (out / "ca").resolve()
    (out / "broker" / "fedprune-security.conf").write_text("\n".join([
        f"listener {listener_port}", f"cafile {ca_dir / 'ca.crt'}",
        f"certfile {broker_dir / 'server.crt'}", f"keyfile {broker_dir / 'server.key'}",
        "require_certificate false", "allow_anonymous false",
        f"password_file {broker_dir / 'passwords'}", f"acl_file {broker_dir / 'acl'}", ""]))
    signing = Ed25519PrivateKey.generate()
    coordinator = out / "coordinator"
    _write_private(coordinator / "signing.key", _pem_key(signing))
    public = signing.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    (coordinator / "signing.pub").write_bytes(public)
    shutil.copy(out / "ca" / "ca.crt", coordinator / "ca.crt")
    _write_private(coordinator / "coordinator.toml", "\n".join([
        f'signing_key = "{(coordinator / "signing.key").resolve()}"', "", "[broker]",
        f'url = "{broker_url}"', f'fleet = "{fleet}"', f'client_id = "{COORDINATOR_USER}"',
        f'username = "{COORDINATOR_USER}"', f'password = "{coordinator_password}"',
        f'tls_ca = "{(coordinator / "ca.crt").resolve()}"', ""]).encode())
    for device in devices:
        folder = out / "devices" / device
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "ca" / "ca.crt", folder / "ca.crt")
        (folder / "coordinator.pub").write_bytes(public)
        config = EdgeConfig(device_id=device, broker=broker_url, fleet=fleet,
                            state_dir=f"/var/lib/fedprune-edge/{device}", username=device,
                            password=passwords[device], tls_ca=str((folder / "ca.crt").resolve()),
                            coordinator_key=str((folder / "coordinator.pub").resolve()))
        _write_private(folder / "edge.toml", config.to_toml().encode())
    return {"devices": devices, "out": str(out), "broker_conf": str(out / "broker" / "fedprune-security.conf")}
