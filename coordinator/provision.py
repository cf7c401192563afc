"""`fedprune coordinator provision`: credentials, broker ACLs, TLS and signing keys for a fleet.

Two folders. The output folder (--out, default fleet/) holds nothing secret:
    ca/ca.crt                             the fleet's certificate authority
    broker/server.crt                     the broker's certificate, for --broker-host names
    broker/acl                            per-device topic ACLs (user name = device id)
    broker/fedprune-security.conf         the listener, password_file, acl_file and client-id binding
    coordinator/signing.pub               the coordinator's public key (devices verify tasks with it)
The secrets folder (--secrets-dir, default $XDG_CONFIG_HOME/fedprune/<fleet>, i.e.
~/.config/fedprune/<fleet>: outside any working tree, so no `git add .` takes a key) holds
the rest, folders 0700 and files 0600:
    ca/ca.key                             the CA's key (keep it offline)
    broker/server.key, broker/passwords   the broker's key, Mosquitto's (hashed) password file
    coordinator/coordinator.toml          broker credentials, CA and signing key
    coordinator/coordinator-<i>.toml      instead, with coordinators=N > 1 (cluster mode): one per
                                          coordinator, each its own broker user and client id
                                          fedprune-coordinator-<i> and [cluster] node c<i>
    coordinator/signing.key, ca.crt       Ed25519: the coordinator signs tasks, devices verify
    devices/<id>/                         a device folder, portable: copy it to the device as it is
      edge.toml                           its id, broker password, data shard and profile; every
                                          path in it relative to the folder
      ca.crt, coordinator.pub             the fleet CA, the coordinator's public key
      profile.json                        with --profile FILE: the profile it was given
      state/                              its state_dir, created (with its marker) so the agent
                                          starts without --new-state (edge_sdk/agent/state.py)
A device folder holds the device's own password and nothing of any other identity: never the
coordinator's signing key, the CA key or another device's password. Give the same folder for
both (out == secrets) and everything lands in one folder, as it did before.

Device i gets `[data] device_index = i` of `clients` = the number of devices (the benchmark
shard, a placeholder for its own data) and the profiles asked for round-robin; without any,
`profile = "measure"`: each device profiles itself on its first start.

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
import os
import secrets
import shutil
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from device_profiles import catalogue_names, load_profile
from device_profiles.files import atomic_write
from edge_sdk.agent import EdgeSettings
from edge_sdk.agent.state import create_state_dir
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


def default_secrets_dir(fleet: str) -> Path:
    """Where a fleet's secrets go unless told: the user's config folder (XDG), per fleet."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    home = Path(base) if Path(base).is_absolute() else Path.home() / ".config"
    return home / "fedprune" / check_id("fleet", fleet)


def _private_dir(path: Path) -> None:
    """`path` and whichever of its parents are missing, each created 0700 (never chmodded)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        os.mkdir(folder, 0o700)


def _device_profiles(profiles: list[str] | None) -> list[str]:
    """Each --profile as edge.toml's `profile`: "measure", "catalogue:<class>" (a bare class
    name too), or a profile JSON file (checked now; copied into the device's folder)."""
    specs = []
    for given in profiles or ["measure"]:
        name = given.removeprefix("catalogue:")
        if given == "measure":
            specs.append(given)
        elif name in catalogue_names():
            specs.append(f"catalogue:{name}")
        elif given.startswith("catalogue:"):
            raise ValueError(f"--profile {given}: no such device class; the catalogue has: "
                             f"{', '.join(catalogue_names())}")
        elif not Path(given).is_file():
            raise ValueError(f"--profile {given}: neither a catalogue class "
                             f"({', '.join(catalogue_names())}), nor 'measure', nor a profile "
                             "JSON file (`fedprune-edge profile --out FILE`)")
        else:
            load_profile(given)  # ProfileError (a ValueError) saying what is wrong with it
            specs.append(given)
    return specs


def _refuse_to_overwrite(out: Path, secrets_dir: Path) -> None:
    """Provisioning again replaces the CA, every key and every password: the devices and the
    broker set up from the first run would be locked out, so it is never done silently."""
    for folder, name in ((secrets_dir, "ca/ca.key"), (out, "ca/ca.crt")):
        if (folder / name).exists():
            raise ValueError(f"{folder} already holds a provisioned fleet ({name}); provisioning "
                             "again would replace its CA, keys and passwords and lock out the "
                             "devices set up from it. Remove it first, or choose another --out, "
                             "--secrets-dir or --fleet")
    if secrets_dir.exists() and secrets_dir.stat().st_mode & 0o077:
        raise ValueError(f"secrets folder {secrets_dir} is open to other users (mode "
                         f"{secrets_dir.stat().st_mode & 0o777:o}); chmod 700 it, or give a "
                         "--secrets-dir that does not exist yet")


def _certificates(out: Path, secrets_dir: Path, hosts: list[str]) -> None:
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
    atomic_write(secrets_dir / "ca" / "ca.key", _pem_key(ca_key), private=True)
    atomic_write(out / "broker" / "server.crt", server.public_bytes(serialization.Encoding.PEM))
    atomic_write(secrets_dir / "broker" / "server.key", _pem_key(server_key), private=True)


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
              fleet: str = "default", listener_port: int = 8883, coordinators: int = 1,
              secrets_dir: str | Path | None = None, profiles: list[str] | None = None) -> dict:
    """`coordinators` > 1: a cluster's (docs/DEPLOYMENT.md), each with its own broker user,
    password, client id and config (coordinator/coordinator-<i>.toml, cluster enabled, node c<i>;
    set `database` to the cluster's PostgreSQL in each). `secrets_dir`: default_secrets_dir(fleet).
    `profiles`: assigned round-robin (see `_device_profiles`)."""
    out = Path(out).expanduser().resolve()
    check_id("fleet", fleet)
    secret = (Path(secrets_dir).expanduser() if secrets_dir is not None
              else default_secrets_dir(fleet)).resolve()
    if not 1 <= coordinators <= 64:
        raise ValueError(f"coordinators must be from 1 to 64 (got {coordinators})")
    if not devices:
        raise ValueError("no devices to provision: give at least one device id")
    for device in devices:
        check_id("device id", device)
        if is_reserved(device):
            raise ValueError(f"device id {device!r} is, or may become, a coordinator's own broker "
                             f"user name and client id ({COORDINATOR_USER}, "
                             f"{COORDINATOR_USER}-<n>); give the device another id")
    if len(set(devices)) != len(devices):
        raise ValueError("device ids must be unique")
    specs = _device_profiles(profiles)
    try:
        _refuse_to_overwrite(out, secret)
        return _write(out, secret, devices, broker_url, broker_hosts, fleet, listener_port,
                      coordinators, specs)
    except OSError as exc:  # a folder that may not be written, a full disk
        raise ValueError(f"provisioning stopped: {exc.filename or 'a file'}: {exc.strerror or exc}; "
                         f"remove what it wrote ({out}, {secret}) and run it again") from None
    except subprocess.CalledProcessError as exc:
        said = (exc.stderr or b"").decode(errors="replace").strip()[:300]
        raise ValueError(f"mosquitto_passwd failed ({said}); remove {out} and {secret} and run it "
                         "again") from None


def _write(out: Path, secret: Path, devices: list[str], broker_url: str, broker_hosts: list[str],
           fleet: str, listener_port: int, coordinators: int, specs: list[str]) -> dict:
    topics = Topics(fleet)
    for folder in ("ca", "broker", "coordinator", "devices"):
        _private_dir(secret / folder)
    _certificates(out, secret, broker_hosts)
    passwords = {device: secrets.token_urlsafe(24) for device in devices}
    users = {user: secrets.token_urlsafe(24) for user in coordinator_users(coordinators)}
    _password_file(secret / "broker" / "passwords", {**users, **passwords})
    atomic_write(out / "broker" / "acl", acl_text(topics, list(users)).encode())
    broker_conf = out / "broker" / "fedprune-security.conf"
    atomic_write(broker_conf, "\n".join([
        f"listener {listener_port}", f"cafile {out / 'ca' / 'ca.crt'}",
        f"certfile {out / 'broker' / 'server.crt'}", f"keyfile {secret / 'broker' / 'server.key'}",
        "require_certificate false", "allow_anonymous false",
        f"password_file {secret / 'broker' / 'passwords'}", f"acl_file {out / 'broker' / 'acl'}",
        "# The client id is the user name, whatever the client asks for: no client can take over",
        "# another's persistent session (and the messages queued in it) by using its client id.",
        "use_username_as_clientid true", ""]).encode())
    signing = Ed25519PrivateKey.generate()
    coordinator = secret / "coordinator"
    ca_cert = (out / "ca" / "ca.crt").read_bytes()
    atomic_write(coordinator / "signing.key", _pem_key(signing), private=True)
    public = signing.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write(out / "coordinator" / "signing.pub", public)
    atomic_write(coordinator / "ca.crt", ca_cert)
    configs = []
    for i, (user, password) in enumerate(users.items()):
        cluster = [] if coordinators == 1 else [
            "", "[cluster]", "enabled = true", f'node = "c{i}"',
            "# and, above [broker], the cluster's one PostgreSQL database (the same on every one):",
            '# database = "postgresql+psycopg://USER@HOST:5432/DB"']
        name = "coordinator.toml" if coordinators == 1 else f"coordinator-{i}.toml"
        configs.append(coordinator / name)
        atomic_write(coordinator / name, "\n".join([
            f'signing_key = "{coordinator / "signing.key"}"', "", "[broker]",
            f'url = "{broker_url}"', f'fleet = "{fleet}"', f'client_id = "{user}"',
            f'username = "{user}"', f'password = "{password}"',
            f'tls_ca = "{coordinator / "ca.crt"}"', *cluster, ""]).encode(), private=True)
    folders = {}
    for i, device in enumerate(devices):
        folder = secret / "devices" / device
        _private_dir(folder)
        atomic_write(folder / "ca.crt", ca_cert)
        atomic_write(folder / "coordinator.pub", public)
        profile = specs[i % len(specs)]
        if profile not in ("measure",) and not profile.startswith("catalogue:"):
            atomic_write(folder / "profile.json", Path(profile).read_bytes())
            profile = "profile.json"
        # Relative paths, read from the folder edge.toml is in: the folder works wherever it is.
        config = EdgeSettings(device_id=device, broker=broker_url, fleet=fleet, state_dir="state",
                              profile=profile, username=device, password=passwords[device],
                              tls_ca="ca.crt", coordinator_key="coordinator.pub",
                              data={"clients": len(devices), "device_index": i})
        atomic_write(folder / "edge.toml", (_EDGE_HEADER.format(i=i, n=len(devices))
                                            + config.to_toml()).encode(), private=True)
        create_state_dir(folder / "state", device, "fedprune coordinator provision")
        folders[device] = folder
    return {"devices": devices, "out": out, "secrets": secret, "broker_conf": broker_conf,
            "coordinator_configs": configs, "device_folders": folders,
            "profiles": {device: specs[i % len(specs)] for i, device in enumerate(devices)}}


_EDGE_HEADER = """\
# From `fedprune coordinator provision`: copy this whole folder to the device and run, there,
#     fedprune-edge run --config edge.toml
# Paths are relative to this folder. It holds this device's broker password: keep it 0600.
# [data] is shard {i} of {n} of the benchmark, a placeholder: give the device's own samples
# (docs/YOUR-MODEL.md, "The `[data]` table").

"""
