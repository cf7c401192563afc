"""What the tests share, written once: brokers, device and coordinator processes, waiting, ports.

- `ports`: `free_port`, a free loopback TCP port.
- `waiting`: `wait_until` (poll a condition against a deadline, failing at once when a watched
  process exits) and `poll_until` (the same, reporting instead of failing). No test sleeps to
  synchronise: it waits for a condition, an event or a message.
- `processes`: `Process` (`python -m ...` with its log, restartable) and `stop_processes`
  (a signal, then SIGKILL by pid for any process still running after the timeout).
- `brokers`: `Mosquitto` (the shipped deploy/mosquitto/mosquitto.conf on a free port, stopped by
  pid), `running_mosquitto`, `provisioned_mosquitto` (TLS, passwords and ACLs from
  `fedprune coordinator provision`) and `MqttPeer` (a plain MQTT client that records what it is
  sent and publishes at QoS 1).
- `devices`: edge agents as `fedprune-edge run` processes (`start_edge_agent`), a coordinator as a
  `fedprune coordinator serve` process, and in-process agents (`captured_agent`, `running_agent`).
- `fleet`: the real round engine and real edge agents without a broker, message by message
  (`Harness`).
- `messages`: hand-built wire messages (`raw_envelope`, `update_message`).
- `databases`: the PostgreSQL the tests use, emptied around each test.
- `slicing_parity`: seeded global models and the zeroed-units reference of the slicing tests.
- `models`: networks fedprune has no code for, registered on import (`mobilenet_style`, a
  MobileNetV2 with BatchNorm, depthwise convolutions and residual adds; `signal_cnn`, 1-D).
- `codec_payloads`: tensor payloads built straight from the documented format.

Fixtures built on these (`broker`, `sqlite_url`, `db_url`, the Fashion-MNIST data, the trained
checkpoint and its export bundle) are in tests/conftest.py.
"""
