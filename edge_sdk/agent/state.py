"""What a device keeps on disk so a restart loses nothing: model, ledger, finished tasks, outbox.

    state_dir/
      device.json       the marker: whose state this is (open_state_dir)
      model.pt          the personalized model (Checkpoint), private tensors included
      sent.pt           what DP-SGD trained, when the personal model is fine-tuned apart from it
      ledger.json       every DP step the device has spent (nothing of a refused task)
      fence.json        the newest leader epoch and round it acted on (stale messages refused)
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

from pydantic import BaseModel, ConfigDict, Field

from device_profiles.files import atomic_publish_dir, atomic_write, recover_dir

from ..protocol.topics import check_id
from ..runtime.manifest import MANIFEST_NAME
from ..training import PrivacyLedger


class StateError(ValueError):
    """A name that would put a file outside the device's state directory, or a state directory
    that cannot be used; nothing was written."""


MARKER = "device.json"
# What an agent leaves in its state_dir: any of them makes a folder without the marker (one an
# older version wrote) this device's state all the same.
_STATE_FILES = ("ledger.json", "tasks.json", "fence.json", "model.pt", "sent.pt", "outbox", "artifact")


def create_state_dir(path: str | Path, device_id: str, created_by: str) -> Path:
    """A new, empty state folder (0700: it will hold the device's model and privacy ledger)
    with its marker. StateError, naming the path, when it cannot be created."""
    root = Path(path)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        root.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise StateError(_cannot_create(root, exc)) from None
    atomic_write(root / MARKER, json.dumps({"device_id": device_id, "created_by": created_by}).encode(),
                 private=True)
    return root


def open_state_dir(path: str | Path, device_id: str, new: bool = False) -> Path:
    """The state folder `fedprune-edge run` starts on, checked first.

    A state_dir that does not exist is created only when the device is new on purpose (`new`,
    --new-state): otherwise a typo in state_dir would start an empty privacy ledger at epsilon
    0 while the real one sits elsewhere. A folder marked as another device's is refused (two
    devices on one ledger), and so is an existing folder that holds neither a marker nor any
    agent state, unless `new`: a state_dir pointing at the wrong, existing folder. An empty
    folder (systemd's StateDirectory=) or an older agent's state is adopted: the marker is
    written."""
    root = Path(path)
    advice = "fix state_dir"
    try:
        if not root.exists():
            if not new:
                raise StateError(f"state_dir {root} does not exist; if this device is new, pass "
                                 "--new-state; if it has run before, its privacy ledger is "
                                 "elsewhere: fix state_dir")
            return create_state_dir(root, device_id, "fedprune-edge run --new-state")
        if not root.is_dir():
            raise StateError(f"state_dir {root} is a file, not a folder; {advice}")
        marker = root / MARKER
        if marker.exists():
            owner = _marked_device(marker)
            if owner != device_id:
                raise StateError(
                    f"state_dir {root} holds the state of device {owner!r} ({marker}), not "
                    f"{device_id!r}: two devices must not share one privacy ledger; {advice} (or, "
                    f"if this device was renamed, set device_id in {marker})")
            return root
        held = [name for name in _STATE_FILES if (root / name).exists()]
        if not held and any(root.iterdir()) and not new:
            raise StateError(f"state_dir {root} is a folder with other files and no device "
                             f"state in it (no {MARKER}, no ledger.json); {advice}, or pass "
                             "--new-state to keep this device's state there")
    except OSError as exc:
        raise StateError(f"state_dir {root} cannot be used ({exc.strerror or exc}); {advice}") from None
    return create_state_dir(root, device_id, "adopted by fedprune-edge run")


def _marked_device(marker: Path) -> str:
    try:
        device = json.loads(marker.read_text())["device_id"]
    except (ValueError, KeyError, TypeError):
        device = None
    if not isinstance(device, str):
        raise StateError(f"{marker} is not a state folder marker (JSON with device_id); restore it "
                         "or remove it")
    return device


def _cannot_create(root: Path, exc: OSError) -> str:
    """Why `root` cannot be made, naming the file in the way when there is one."""
    try:
        blocking = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), None)
    except OSError:
        blocking = None
    if blocking is not None:
        return (f"state_dir {root} cannot be created: {blocking} is a file, not a folder; "
                "fix state_dir or move the file")
    return f"state_dir {root} cannot be created ({exc.strerror or exc}); fix state_dir"


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


class Fence(BaseModel):
    """The newest leader epoch and round this device has acted on (trained a task of, stored an
    artifact of). A TASK or ARTIFACT from an older epoch (a deposed leader) or of an older round
    (a replay; an artifact that would roll the exported model back) is stale.

    Rounds are counted as tasks count them: an artifact of global model r is the model round
    r + 1 starts from, and is sent with round r + 1's task, so it stands for round r + 1.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    leader_epoch: int = Field(0, ge=0)
    round: int = Field(0, ge=0)

    def stale(self, what: str, leader_epoch: int, round_number: int) -> str | None:
        """Why a `what` ("task of round 3", say) from `leader_epoch` for task round
        `round_number` is stale, or None when it is not."""
        if leader_epoch < self.leader_epoch:
            return (f"{what} comes from leader epoch {leader_epoch}, older than epoch "
                    f"{self.leader_epoch} this device has already acted on: a deposed leader's "
                    "message is not acted upon")
        if round_number < self.round:
            return (f"{what} is older than round {self.round}, which this device has already "
                    "acted on: a replay or a late message, refused so the device never goes back "
                    "to an older model")
        return None

    def advanced(self, leader_epoch: int, round_number: int) -> Fence:
        return Fence(leader_epoch=max(self.leader_epoch, leader_epoch),
                     round=max(self.round, round_number))


class DeviceState:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "outbox").mkdir(exist_ok=True)
        except OSError as exc:
            raise StateError(_cannot_create(self.root, exc)) from None
        recover_dir(self.artifact_dir)  # a bundle swap cut short by a crash: keep the old one

    # --- privacy -------------------------------------------------------------------------
    def load_ledger(self) -> PrivacyLedger | None:
        """The ledger as last saved (a noise multiplier that older versions kept beside it is
        ignored: each task works out its own)."""
        path = self.root / "ledger.json"
        if not path.exists():
            return None
        return PrivacyLedger.from_json(json.dumps(json.loads(path.read_text())["ledger"]))

    def save_ledger(self, ledger: PrivacyLedger) -> None:
        atomic_write(self.root / "ledger.json",
                     json.dumps({"ledger": json.loads(ledger.to_json())}).encode())

    # --- fencing -------------------------------------------------------------------------
    def load_fence(self) -> Fence:
        path = self.root / "fence.json"
        return Fence.model_validate_json(path.read_bytes()) if path.exists() else Fence()

    def save_fence(self, fence: Fence) -> None:
        atomic_write(self.root / "fence.json", fence.model_dump_json().encode())

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
