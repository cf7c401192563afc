"""What a device keeps on disk so a restart loses nothing: model, ledger, finished tasks, outbox.

    state_dir/
      model.pt          the personalized model (Checkpoint), private tensors included
      ledger.json       every DP step the device has spent, and the noise it calibrated
      tasks.json        finished task keys -> "sent" | "acked" | "refused"
      outbox/<key>.bin  update envelopes not yet acknowledged; resent until acknowledged
      artifact/         the latest exported model bundle (manifest.json + model-<p>.<f>.zst)

Every file is replaced with `device_profiles.files` (fsynced, renamed, directory fsynced), and
the ledger and model are written before the update is published: privacy spent is never
forgotten, even if the update is lost or the power is cut.

Names that come from messages (task ids) are checked with the protocol's id rule before they
become part of a file name, and every path is resolved and checked to stay in its folder:
the checks at parse time are the first line, these the second.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from device_profiles.files import atomic_publish_dir, atomic_write, recover_dir

from ..protocol.topics import check_id
from ..runtime.manifest import MANIFEST_NAME
from ..training import PrivacyLedger


class StateError(ValueError):
    """A name that would put a file outside the device's state directory; nothing was written."""


def task_key(round_number: int, task: str) -> str:
    """The file-safe key of (round, task); refuses a task id that is not a protocol id."""
    if not isinstance(round_number, int) or round_number < 0:
        raise StateError(f"round {round_number!r} is not a round number")
    try:
        check_id("task id", task)
    except (ValueError, TypeError) as exc:
        raise StateError(str(exc)) from None
    return f"r{round_number:06d}-{task}"


def check_plain_name(name: str) -> str:
    """`name` if it is one file name (no folder part, not '.' or '..'); StateError otherwise."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name \
            or "\0" in name or Path(name).name != name:
        raise StateError(f"{str(name)[:200]!r} is not a plain file name")
    return name


def inside(folder: Path, name: str) -> Path:
    """`folder / name`, refused unless it is a plain name that resolves (symlinks followed) to
    a child of `folder`."""
    path = folder / check_plain_name(name)
    if path.resolve().parent != folder.resolve():
        raise StateError(f"{name!r} resolves outside {folder}; refused")
    return path


class DeviceState:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "outbox").mkdir(exist_ok=True)
        recover_dir(self.artifact_dir)  # a bundle swap cut short by a crash: keep the old one

    # --- privacy -------------------------------------------------------------------------
    def load_ledger(self) -> tuple[PrivacyLedger | None, float | None]:
        path = self.root / "ledger.json"
        if not path.exists():
            return None, None
        data = json.loads(path.read_text())
        return PrivacyLedger.from_json(json.dumps(data["ledger"])), data.get("noise_multiplier")

    def save_ledger(self, ledger: PrivacyLedger, noise_multiplier: float | None) -> None:
        atomic_write(self.root / "ledger.json", json.dumps(
            {"ledger": json.loads(ledger.to_json()), "noise_multiplier": noise_multiplier}).encode())

    # --- tasks and outbox ----------------------------------------------------------------
    def tasks(self) -> dict[str, str]:
        path = self.root / "tasks.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def mark(self, key: str, status: str) -> None:
        tasks = self.tasks()
        tasks[key] = status
        atomic_write(self.root / "tasks.json", json.dumps(tasks, indent=1).encode())

    def _outbox_path(self, key: str) -> Path:
        return inside(self.root / "outbox", f"{key}.bin")

    def put_outbox(self, key: str, envelope: bytes) -> None:
        atomic_write(self._outbox_path(key), envelope)

    def outbox(self) -> list[tuple[str, bytes]]:
        """Unacknowledged updates; one acknowledged (and dropped) while this reads is left out."""
        entries = ((key, self.outbox_entry(key)) for key in self.outbox_keys())
        return [(key, envelope) for key, envelope in entries if envelope is not None]

    def outbox_keys(self) -> list[str]:
        return [p.stem for p in sorted((self.root / "outbox").glob("*.bin"))]

    def outbox_entry(self, key: str) -> bytes | None:
        try:
            return self._outbox_path(key).read_bytes()
        except FileNotFoundError:
            return None

    def drop_outbox(self, key: str) -> None:
        self._outbox_path(key).unlink(missing_ok=True)

    # --- artifacts -----------------------------------------------------------------------
    @property
    def artifact_dir(self) -> Path:
        return self.root / "artifact"

    def save_artifact(self, manifest: dict, name: str, packed: bytes) -> None:
        """Swap in a new bundle as a whole: the old one stays usable until the new one is complete.

        `name` must be a plain file name (the caller builds it from validated fields, never
        from a message); it is checked again here.
        """
        staging = self.root / "artifact.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        # A fresh folder no reader looks at: plain writes; the publish fsyncs each file once.
        inside(staging, name).write_bytes(packed)
        (staging / MANIFEST_NAME).write_bytes(json.dumps(manifest, indent=2).encode())
        atomic_publish_dir(staging, self.artifact_dir)
