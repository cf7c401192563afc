"""One way to open an MQTT 3.1.1 connection, for devices and the coordinator alike.

`mqtt://host[:1883]` is plaintext; `mqtts://host[:8883]` is TLS, verified against `tls_ca` (the
fleet's CA from `fedprune coordinator provision`) or the system's trust store. Credentials are
the broker's password-file users; with the provisioned ACLs a device's user name is its id.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import urlparse

import paho.mqtt.client as mqtt


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parsed = urlparse(url)
        if parsed.scheme not in ("mqtt", "tcp", "mqtts", "ssl") or not parsed.hostname:
            raise ValueError(f"broker must look like mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got {url!r}")
        tls = parsed.scheme in ("mqtts", "ssl")
        return cls(parsed.hostname, parsed.port or (8883 if tls else 1883), tls)


def make_client(client_id: str, url: str, username: str | None = None, password: str | None = None,
                tls_ca: str | None = None, clean_session: bool = False) -> tuple[mqtt.Client, BrokerAddress]:
    address = BrokerAddress.parse(url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv311, clean_session=clean_session)
    if address.tls:
        client.tls_set(ca_certs=tls_ca, cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    elif tls_ca:
        raise ValueError(f"tls_ca is set but {url} is not mqtts://; use mqtts://HOST:PORT for TLS")
    if username is not None:
        client.username_pw_set(username, password)
    return client, address
