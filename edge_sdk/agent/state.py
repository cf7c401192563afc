"""What a device keeps on disk so a restart loses nothing: model, ledger, finished tasks, outbox.

    state_dir/
      model.pt          the personalized model (Checkpoint), private tensors included
      ledger.json       every DP step the device has spent, and the noise it calibrated
      tasks.json        finished task keys -> "sent" | "acked" | "refused"
      outbox/<key>.bin  update envelopes not yet acknowledged; resent after a reconnect
      artifact/         the latest exported model bundle (manifest.json + *.zst)

Every file is replaced atomically, and the ledger and model are written before the update is
published: privacy spent is never forgotten, even if the update is lost.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..training import PrivacyLedger


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")
    with open(staging, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def task_key(round_number: int, task: str) -> str:
    return f"r{round_number:06d}-{task}"


class DeviceState:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "outbox").mkdir(exist_ok=True)

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

    def put_outbox(self, key: str, envelope: bytes) -> None:
        atomic_write(self.root / "outbox" / f"{key}.bin", envelope)

    def outbox(self) -> list[tuple[str, bytes]]:
        return [(p.stem, p.read_bytes()) for p in sorted((self.root / "outbox").glob("*.bin"))]

    def outbox_entry(self, key: str) -> bytes | None:
        path = self.root / "outbox" / f"{key}.bin"
        return path.read_bytes() if path.exists() else None

    def drop_outbox(self, key: str) -> None:
        (self.root / "outbox" / f"{key}.bin").unlink(missing_ok=True)

    # --- artifacts -----------------------------------------------------------------------
    @property
    def artifact_dir(self) -> Path:
        return self.root / "artifact"

    def save_artifact(self, manifest: dict, name: str, packed: bytes) -> None:
        """Swap in a new bundle as a whole: the old one stays usable until the new one is complete."""
        staging = self.root / "artifact.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        (staging / name).write_bytes(packed)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        old = self.root / "artifact.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.artifact_dir.exists():
            os.replace(self.artifact_dir, old)
        os.replace(staging, self.artifact_dir)
        shutil.rmtree(old, ignore_errors=True)
