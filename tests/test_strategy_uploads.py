"""What a device of a personalised strategy sends: exactly the encoding of the tensors its plan
uploads, never a private one (FedPer, FedRep and FFGG keep the head; FedP3 uploads it but never
has it overwritten); FedRep trains the head, then the body; FedDP's thresholded uploads leave the
pruned entries at home."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk import codec
from harness.strategies import one_task


@pytest.mark.parametrize("strategy", ["fedp3", "fedper", "fedrep", "ffgg", "feddp"])
def test_uploads_are_exactly_their_encoding_and_carry_no_private_tensor(strategy, fmnist_clients):
    strategy_obj, plan, outcome = one_task(strategy, fmnist_clients)
    update = codec.decode(outcome.payload)
    assert set(update) == set(plan.uploaded)
    private = {t.name for t in plan.tensors if t.private}
    if strategy in ("fedper", "fedrep", "ffgg"):  # the head never leaves the device
        assert private == set(strategy_obj.layers[-1]) and not private & set(update)
    if strategy == "fedp3":  # FedP3's head is uploaded but never overwritten from the server
        assert private == set(strategy_obj.layers[-1]) and private <= set(update)
    assert codec.encode(update, codec.ValueDtype.FLOAT32) == outcome.payload  # bytes = encoding


def test_fedrep_trains_head_then_body_and_feddp_threshold_uploads_no_pruned_entry(fmnist_clients):
    _, plan, _ = one_task("fedrep", fmnist_clients)
    (head, body) = plan.phases
    assert head.epochs == 2 and set(head.tensors) == {t.name for t in plan.tensors if t.private}
    assert body.epochs == 1 and set(body.tensors) == set(plan.uploaded)
    _, plan, outcome = one_task("feddp", fmnist_clients, **{"feddp.threshold": 0.02})
    update = codec.decode(outcome.payload)
    conv = "layers.0.conv.weight"
    assert update[conv].indices is not None and np.all(update[conv].values != 0)
    assert len(update[conv].indices) < np.prod(update[conv].shape)  # pruned entries stayed home
