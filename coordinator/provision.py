"""`fedprune coordinator provision`: credentials, broker ACLs, TLS and signing keys for a fleet.

Writes, under --out:
    ca/ca.crt, ca/ca.key                  the fleet's certificate authority (keep ca.key offline)
    broker/server.crt, server.key         the broker's certificate, for --broker-host names
    broker/passwords                      Mosquitto password file (hashed by `mosquitto_passwd`)
    broker/acl                            per-device topic ACLs (user name = device id)
    broker/fedprune-security.conf         the listener, password_file, acl_file and client-id binding
    coordinator/coordinator.toml          broker credentials, CA and signing key
    coordinator/coordinator-<i>.toml      instead, with coordinators=N > 1 (cluster mode): one per
                                          coordinator, each its own broker user and client id
                                          fedprune-coordinator-<i> and [cluster] node c<i>
    coordinator/signing.key, signing.pub  Ed25519: the coordinator signs tasks, devices verify
    devices/<id>/edge.toml                each device's credentials, CA and the coordinator's key
Passwords are random (secrets.token_urlsafe); nothing is reused between devices. Keys, passwords
and configs holding a password are created with mode 0600 (device_profiles.files.atomic_write),
never readable by others even for a moment. The broker binds each client id to its user name
(`use_username_as_clientid`), so a device cannot connect under another's client id and take over
its session (or the coordinator's) with the queued messages in it; device ids the coordinators
use themselves (fedprune-coordinator, fedprune-coordinator-<anything>) are refused. The
coordinators of a cluster each get their own user: one shared user would give them one client id,
and the broker would close each one's connection as the other connects.
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

from device_profiles.files import atomic_write
from edge_sdk.agent import EdgeSettings
from edge_sdk.protocol.topics import Topics, check_id

COORDINATOR_USER = "fedprune-coordinator"  # its broker user name and client id


def coordinator_users(count: int) -> list[str]:
    """The coordinators' broker user names (and client ids): one coordinator keeps the name it
    always had; the N of a cluster are fedprune-coordinator-0 ... -<N-1>."""
    return [COORDINATOR_USER] if count == 1 else [f"{COORDINATOR_USER}-{i}" for i in range(count)]


def is_reserved(device: str) -> bool:
    """Whether a device id is, or may become, a coordinator's user name (names no device may have)."""
    return device == COORDINATOR_USER or device.startswith(f"{COORDINATOR_USER}-")


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
    atomic_write(out / "ca" / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    atomic_write(out / "ca" / "ca.key", _pem_key(ca_key), private=True)
    atomic_write(out / "broker" / "server.crt", server.public_bytes(serialization.Encoding.PEM))
    atomic_write(out / "broker" / "server.key", _pem_key(server_key), private=True)


def _password_file(path: Path, users: dict[str, str]) -> None:
    """Mosquitto's hashed password file: written in plain text (0600), then hashed in place by
    `mosquitto_passwd -U`, under umask 077 because the tool's own backup copy would otherwise
    be created readable by others."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        raise ValueError("mosquitto_passwd is not installed; install mosquitto (apt-get install "
                         "mosquitto) on the machine that provisions the fleet")
    atomic_write(path, "".join(f"{user}:{password}\n" for user, password in users.items()).encode(),
                 private=True)
    subprocess.run([tool, "-U", str(path)], check=True, capture_output=True, umask=0o077)


def acl_text(topics: Topics, coordinators: list[str] = (COORDINATOR_USER,)) -> str:
    root = topics.root
    lines = [line for user in coordinators for line in (f"user {user}", f"topic readwrite {root}/#", "")]
    lines += ["# every other user is a device whose user name is its id (%u)"]
    lines += [f"pattern write {root}/{kind}/%u" for kind in ("register", "status", "update", "refusal")]
    lines += [f"pattern read {root}/{kind}/%u" for kind in ("task", "ack", "artifact")]
    lines += [f"pattern readwrite {topics.profile('%u')}"]  # its own link test (profile = "measure")
    return "\n".join(lines) + "\n"


def provision(out: str | Path, devices: list[str], broker_url: str, broker_hosts: list[str],
              fleet: str = "default", listener_port: int = 8883, coordinators: int = 1) -> dict:
    """`coordinators` > 1: a cluster's (docs/DEPLOYMENT.md), each with its own broker user,
    password, client id and config (coordinator/coordinator-<i>.toml, cluster enabled, node c<i>;
    set `database` to the cluster's PostgreSQL in each)."""
    out = Path(out)
    if not 1 <= coordinators <= 64:
        raise ValueError(f"coordinators must be from 1 to 64 (got {coordinators})")
    for device in devices:
        check_id("device id", device)
        if is_reserved(device):
            raise ValueError(f"device id {device!r} is, or may become, a coordinator's own broker "
                             f"user name and client id ({COORDINATOR_USER}, "
                             f"{COORDINATOR_USER}-<n>); give the device another id")
    if len(set(devices)) != len(devices):
        raise ValueError("device ids must be unique")
    topics = Topics(fleet)
    _certificates(out, broker_hosts)
    passwords = {device: secrets.token_urlsafe(24) for device in devices}
    users = {user: secrets.token_urlsafe(24) for user in coordinator_users(coordinators)}
    _password_file(out / "broker" / "passwords", {**users, **passwords})
    atomic_write(out / "broker" / "acl", acl_text(topics, list(users)).encode())
    broker_dir = (out / "broker").resolve()
    ca_dir = (out / "ca").resolve()
    atomic_write(out / "broker" / "fedprune-security.conf", "\n".join([
        f"listener {listener_port}", f"cafile {ca_dir / 'ca.crt'}",
        f"certfile {broker_dir / 'server.crt'}", f"keyfile {broker_dir / 'server.key'}",
        "require_certificate false", "allow_anonymous false",
        f"password_file {broker_dir / 'passwords'}", f"acl_file {broker_dir / 'acl'}",
        "# The client id is the user name, whatever the client asks for: no client can take over",
        "# another's persistent session (and the messages queued in it) by using its client id.",
        "use_username_as_clientid true", ""]).encode())
    signing = Ed25519PrivateKey.generate()
    coordinator = out / "coordinator"
    ca_cert = (out / "ca" / "ca.crt").read_bytes()
    atomic_write(coordinator / "signing.key", _pem_key(signing), private=True)
    public = signing.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write(coordinator / "signing.pub", public)
    atomic_write(coordinator / "ca.crt", ca_cert)
    for i, (user, password) in enumerate(users.items()):
        cluster = [] if coordinators == 1 else [
            "", "[cluster]", "enabled = true", f'node = "c{i}"',
            "# and, above [broker], the cluster's one PostgreSQL database (the same on every one):",
            '# database = "postgresql+psycopg://USER@HOST:5432/DB"']
        name = "coordinator.toml" if coordinators == 1 else f"coordinator-{i}.toml"
        atomic_write(coordinator / name, "\n".join([
            f'signing_key = "{(coordinator / "signing.key").resolve()}"', "", "[broker]",
            f'url = "{broker_url}"', f'fleet = "{fleet}"', f'client_id = "{user}"',
            f'username = "{user}"', f'password = "{password}"',
            f'tls_ca = "{(coordinator / "ca.crt").resolve()}"', *cluster, ""]).encode(), private=True)
    for device in devices:
        folder = out / "devices" / device
        atomic_write(folder / "ca.crt", ca_cert)
        atomic_write(folder / "coordinator.pub", public)
        config = EdgeSettings(device_id=device, broker=broker_url, fleet=fleet,
                            state_dir=f"/var/lib/fedprune-edge/{device}", username=device,
                            password=passwords[device], tls_ca=str((folder / "ca.crt").resolve()),
                            coordinator_key=str((folder / "coordinator.pub").resolve()))
        atomic_write(folder / "edge.toml", config.to_toml().encode(), private=True)
    return {"devices": devices, "out": str(out), "broker_conf": str(out / "broker" / "fedprune-security.conf")}
