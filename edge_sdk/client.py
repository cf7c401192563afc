"""What a device does with one task: the code path shared by the simulator and the MQTT edge SDK.

A task is a plan plus an encoded download. The device rebuilds the planned network, keeps its own
copy of private tensors, trains under its plan (and DP, within its privacy budget), and answers
with the encoded values of the entries it trained and is asked to upload.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

import numpy as np
import torch
from torch import nn

from . import codec
from .data.partition import ClientData
from .models import ModelSpec, build_model, tensor_shapes
from .plan import SubmodelPlan, TrainPhase
from .plan_features import build_features
from .pruning import is_prunable, magnitude_mask, top_changes_mask
from .supermask import run_supermask_task
from .training import PrivacyBudgetExceeded, PrivacyLedger, TrainReport, accuracy, dp_sampling, train_locally
from .settings import DeviceState, DPSettings, TrainSettings


class TaskError(ValueError):
    """A task the device cannot run as sent (e.g. a private tensor it never received)."""


@dataclass
class TaskOutcome:
    device_index: int
    round: int
    payload: bytes | None
    num_samples: int
    report: TrainReport | None = None
    epsilon: float | None = None
    refused: str | None = None


class LocalClient:
    def __init__(self, data: ClientData, train: TrainSettings, dp: DPSettings | None = None,
                 planned_rounds: int = 1, seed: int = 0, ledger: PrivacyLedger | None = None,
                 secret_noise: bool = False, selection_rate: float = 1.0,
                 device_state: DeviceState = "model"):
        """`ledger`: what this client has already spent, and the delta it accounts at (a device
        passes its own, restored from disk); by default a new one at dp.delta. `secret_noise`:
        DP noise from the OS's randomness (a real device), not from `seed` (a simulation).
        `device_state`: what it holds between tasks (`DeviceState`)."""
        if device_state not in get_args(DeviceState):
            raise ValueError(f"device_state must be one of {get_args(DeviceState)}, not "
                             f"{device_state!r}")
        self.device_state = device_state
        self.secret_noise = secret_noise
        self.device_index = data.device_index
        self.data = data
        self.train_config = train
        self.dp = dp
        self.seed = seed
        self.planned_rounds = planned_rounds
        # The chance this device is drawn in a round (devices per round / fleet): its DP noise
        # is sized for the tasks it is expected to run, not for every planned round.
        self.selection_rate = selection_rate
        # What DP-SGD trained last: its private tensors start the next DP training, so nothing
        # of the personal model below ever reaches a gradient that is sent.
        self.state: dict[str, torch.Tensor] = {}
        self.spec: ModelSpec | None = None
        # The personal model, when dp.personal_model is "fine_tuned": fine-tuned without noise
        # from each download; None when it is the DP-trained state itself.
        self.personal_state: dict[str, torch.Tensor] | None = None
        # The state the last task started from (its download and private tensors): what a
        # device under secure aggregation sends is its change from it (edge_sdk/secure_update.py).
        self.started: dict[str, torch.Tensor] = {}
        if ledger is None and dp is not None:
            ledger = PrivacyLedger(delta=dp.delta, budget_epsilon=dp.budget, accountant=dp.accountant)
        self.ledger = ledger
        self.scores: dict[str, torch.Tensor] = {}  # HideNseek: the device's own sign scores

    @property
    def num_train(self) -> int:
        return len(self.data.train_y)

    def round_samples(self, plan: SubmodelPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """The training samples of this task: all of them, or the plan's `local_samples` as a
        window that moves on by that many every round, so a device whose compute allows only
        part of its data per round still trains on all of it over the rounds."""
        x, y = self.data.train_x, self.data.train_y
        n = self.samples_this_round(plan)
        if n >= len(y):
            return x, y
        picked = (((plan.round - 1) * n) + np.arange(n)) % len(y)
        index = torch.from_numpy(picked)
        return x[index], y[index]

    def samples_this_round(self, plan: SubmodelPlan) -> int:
        held = len(self.data.train_y)
        return held if plan.local_samples is None else min(plan.local_samples, held)

    def run_task(self, plan: SubmodelPlan, download: bytes) -> TaskOutcome:
        shapes = tensor_shapes(plan.spec)
        received = codec.decode(download, expected_shapes=shapes)
        phases = self._phases(plan)
        train_x, train_y = self.round_samples(plan)
        charge = self.dp_charge(plan)
        noise = None
        if charge is not None:
            noise = charge[0]
            try:
                self.ledger.check_affordable(*charge)
            except PrivacyBudgetExceeded as exc:
                return TaskOutcome(self.device_index, plan.round, None, len(train_y),
                                   epsilon=self.ledger.epsilon(), refused=str(exc))

        features = build_features(plan.features, plan.spec)
        replacing = next((f for f in features if f.replaces_training), None)
        if replacing is not None:
            return self._run_supermask(plan, replacing.params.init_seed, received, train_x, train_y)
        model = build_model(plan.spec)
        start, from_download = self._starting_state(plan, shapes, received)
        model.load_state_dict(start)
        masks: dict[str, torch.Tensor] = {}
        upload_masks: dict[str, np.ndarray] = {}
        for entry in plan.tensors:
            # Entries pruned on the way down were never trained from the global value: don't send.
            sent = received.get(entry.name) if entry.name in from_download else None
            keep = _index_mask(sent) if sent is not None and sent.indices is not None else \
                np.ones(shapes[entry.name], dtype=bool)
            if entry.local_keep < 1.0 and is_prunable(shapes[entry.name]):
                keep &= magnitude_mask(start[entry.name].numpy(), entry.local_keep)
                masks[entry.name] = torch.from_numpy(keep.astype(np.float32))
            upload_masks[entry.name] = keep
        rng = np.random.default_rng(_task_seed(self.seed, self.device_index, plan.round))
        hooks = [feature.hooks(model, rng) for feature in features]
        report = TrainReport()
        for number, phase in enumerate(phases):
            for name, param in model.named_parameters():
                param.requires_grad_(name in phase.tensors)
            part = train_locally(model, train_x, train_y,
                                 self.train_config.model_copy(update={"local_epochs": phase.epochs}),
                                 masks, seed=_task_seed(self.seed, self.device_index, plan.round) + number,
                                 dp=self.dp, noise_multiplier=noise, secret_noise=self.secret_noise,
                                 before_batch=_chain(h.before_batch for h in hooks),
                                 after_epoch=_chain(h.after_epoch for h in hooks))
            report = report.merged(part)
        for hook in hooks:
            hook.remove()
        self.state = {name: p.detach().clone() for name, p in model.named_parameters()}
        self.spec, self.started = plan.spec, start
        epsilon = None
        if self.ledger is not None:
            self.ledger.record(report.privacy_history)
            epsilon = self.ledger.epsilon()
        update = {}
        for name in plan.uploaded:
            trained, sent_mask = self.state[name].numpy(), upload_masks[name]
            for feature in features:
                sent_mask = feature.upload_mask(name, trained, sent_mask)
            if plan.upload_keep < 1.0 and is_prunable(shapes[name]):
                sent_mask = top_changes_mask(start[name].numpy(), trained, sent_mask, plan.upload_keep)
            update[name] = codec.SparseTensor.from_dense(trained, sent_mask)
        payload = codec.encode(update, codec.ValueDtype.from_name(plan.upload_dtype))
        # The upload is fixed above; only then is the personal model trained.
        self.personal_state = self._fine_tuned(plan, start, from_download, masks, train_x, train_y) \
            if self.dp is not None and self.dp.personal_model == "fine_tuned" else None
        self._keep_only_private(plan)
        return TaskOutcome(self.device_index, plan.round, payload, len(train_y),
                           report, epsilon)

    def _keep_only_private(self, plan: SubmodelPlan) -> None:
        """With device_state="private", drop what the next task does not read: it starts every tensor
        but the private ones from its download (`_starting_state`, `_fine_tuned`), so training
        and uploads are the same as with the whole model kept."""
        if self.device_state != "private":
            return
        private = {entry.name for entry in plan.tensors if entry.private}
        self.state = {name: value for name, value in self.state.items() if name in private}
        if self.personal_state is not None:
            self.personal_state = {name: value for name, value in self.personal_state.items()
                                   if name in private}
        self.started = {}

    def _fine_tuned(self, plan: SubmodelPlan, start: dict[str, torch.Tensor],
                    from_download: set[str], masks: dict[str, torch.Tensor],
                    train_x: torch.Tensor, train_y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The personal model: the download (and the personal model's own private tensors)
        trained without noise on this task's samples for dp.personal_epochs, on every tensor the
        task trains. Nothing it computes is sent, so it needs no privacy accounting (the
        device's own predictions are what it does not protect: docs/SECURITY.md)."""
        earlier = self.personal_state if self.personal_state is not None else {}
        begin = {name: value if name in from_download or name not in earlier else earlier[name]
                 for name, value in start.items()}
        model = build_model(plan.spec)
        model.load_state_dict(begin)
        trained = {name for phase in self._phases(plan) for name in phase.tensors}
        for name, param in model.named_parameters():
            param.requires_grad_(name in trained)
        train_locally(model, train_x, train_y,
                      self.train_config.model_copy(update={"local_epochs": self.dp.personal_epochs}),
                      masks,
                      seed=_task_seed(self.seed, self.device_index, plan.round) + _PERSONAL_SEED)
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    def _run_supermask(self, plan: SubmodelPlan, init_seed: int, received, train_x, train_y
                       ) -> TaskOutcome:
        if self.dp is not None:
            raise TaskError("HideNseek's supermask training has no DP variant here; run it without dp")
        if self.spec is None or self.spec.digest() != plan.spec.digest():
            self.scores = {}
        state, upload, report = run_supermask_task(
            plan, init_seed, received, self.scores, train_x, train_y, self.train_config,
            _task_seed(self.seed, self.device_index, plan.round))
        self.state, self.spec, self.personal_state = state, plan.spec, None
        self._keep_only_private(plan)
        payload = codec.encode(upload, codec.ValueDtype.SIGN1, known_indices=set(upload))
        return TaskOutcome(self.device_index, plan.round, payload, len(train_y), report)

    def _phases(self, plan: SubmodelPlan) -> tuple[TrainPhase, ...]:
        return plan.phases or (TrainPhase(tuple(plan.trained), self.train_config.local_epochs),)

    def dp_charge(self, plan: SubmodelPlan) -> tuple[float, float, int] | None:
        """(noise multiplier, sample rate, steps) this task trains at under DP, as the ledger
        records them; None without DP.

        Worked out from this task alone (its dp settings, its samples, batch size and epochs,
        the planned rounds a target_epsilon is spread over), never kept from an earlier task:
        a task that asks for more noise gets it, and one that was refused leaves nothing behind.
        A target_epsilon is spread over the tasks this device is still expected to run
        (`expected_tasks`), given what its ledger has spent.
        """
        if self.dp is None:
            return None
        sample_rate, steps = dp_sampling(self.samples_this_round(plan), self.train_config.batch_size,
                                         sum(phase.epochs for phase in self._phases(plan)))
        if self.dp.noise_multiplier is not None:
            return self.dp.noise_multiplier, sample_rate, steps
        ledger = self.ledger if self.ledger is not None else PrivacyLedger(self.dp.delta, accountant=self.dp.accountant)
        noise = ledger.noise_for_target(self.dp.target_epsilon, sample_rate, steps,
                                        self.expected_tasks(plan.round))
        return noise, sample_rate, steps

    def expected_tasks(self, round_number: int) -> int:
        """The tasks this device plans for from `round_number` on, this one included: of the
        rounds left, as many as it is drawn in with about 97.5% probability (the binomial's mean
        plus two standard deviations), so a device drawn somewhat more often than average still
        has budget for its last task; every round left when it is drawn in all of them."""
        left = max(1, self.planned_rounds - round_number + 1)
        q = self.selection_rate
        mean = left * q
        return max(1, min(left, math.ceil(mean + 2 * math.sqrt(mean * (1 - q)) - 1e-9)))

    def _starting_state(self, plan: SubmodelPlan, shapes, received):
        """Private tensors come from the device's own copy; everything else from the download."""
        same_model = self.spec is not None and self.spec.digest() == plan.spec.digest()
        start: dict[str, torch.Tensor] = {}
        from_download: set[str] = set()
        for entry in plan.tensors:
            if entry.private and same_model and entry.name in self.state:
                start[entry.name] = self.state[entry.name]
            elif entry.name in received:
                start[entry.name] = torch.from_numpy(received[entry.name].to_dense())
                from_download.add(entry.name)
            else:
                raise TaskError(f"task for round {plan.round} sends no value for {entry.name!r} and "
                                "the device holds no copy of it; the coordinator must send it")
        missing = set(shapes) - set(start)
        if missing:
            raise TaskError(f"plan does not cover tensors {sorted(missing)}")
        return start, from_download

    def personal_model(self, base: nn.Module | None = None) -> nn.Module | None:
        """The model the device uses: the noise-free personal model when it keeps one, else
        what it trained last, private tensors included. A device that keeps only its private
        tensors (device_state="private") fills the rest from `base` (the global model) where the
        shapes match; None when it holds no model, or when `base` cannot complete it."""
        if self.spec is None:
            return None
        own = self.personal_state if self.personal_state is not None else self.state
        shapes = tensor_shapes(self.spec)
        missing = shapes.keys() - own.keys()
        if missing:
            fill = {} if base is None else base.state_dict()
            if any(name not in fill or tuple(fill[name].shape) != shapes[name] for name in missing):
                return None
            own = {**fill, **own}
        model = build_model(self.spec)
        model.load_state_dict(own)
        return model

    def evaluate(self, model: torch.nn.Module | None = None) -> float:
        """Accuracy of `model` (default: the device's own) on the device's local test split."""
        model = model if model is not None else self.personal_model()
        if model is None:
            raise TaskError(f"client {self.device_index} has no model yet; give it one to evaluate")
        return accuracy(model, self.data.test_x, self.data.test_y)


def _chain(calls):
    """One call that makes every given call in turn (None: no calls)."""
    calls = [call for call in calls if call is not None]
    if not calls:
        return None

    def chained(*args) -> None:
        for call in calls:
            call(*args)
    return chained


def _index_mask(tensor: codec.SparseTensor) -> np.ndarray:
    mask = np.zeros(tensor.numel, dtype=bool)
    mask[tensor.indices] = True
    return mask.reshape(tensor.shape)


# Added to a task's seed for the personal model's shuffling, apart from the phases' (+0, +1, ...).
_PERSONAL_SEED = 1 << 20


def _task_seed(seed: int, device_index: int, round_number: int) -> int:
    return int(np.random.SeedSequence([seed, device_index, round_number]).generate_state(1)[0])
