"""What the coordinator sends a device for its plan: every tensor, the layers the plan does not
select pruned by magnitude to exactly their share (biases dense), private tensors only to a device
without its own copy, and each distinct download encoded once and shared.

Uses FedP3's Fashion-MNIST CNN: 4 hidden layers (conv, conv, fc, fc) plus the output layer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.strategies import DownloadBuilder
from coordinator.strategies.fedavg import FedAvg
from edge_sdk import codec
from edge_sdk.models import build_model, tensor_shapes
from edge_sdk.pruning import magnitude_mask
from harness.strategies import OUTPUT, SPEC, fedp3, layer_names


@pytest.fixture(scope="module")
def global_state():
    model = build_model(SPEC, seed=0)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_a_pruned_download_of_fedp3s_first_conv_sends_exactly_its_share(global_state):
    # layers.0.conv.weight has exactly 100 entries: global_keep=0.55 must send 55 of them.
    name = "layers.0.conv.weight"
    assert global_state[name].size == 100
    plan = fedp3(selection="lowerb", global_keep=0.55).plan(1, 0, 10)  # layer 0 not selected
    assert plan.tensor(name).download_keep == 0.55
    builder = DownloadBuilder(global_state, codec.ValueDtype.FLOAT32)
    decoded = codec.decode(builder.payload(plan, device_has_private_copy=True))
    assert decoded[name].nnz == 55


def test_a_download_prunes_only_the_weights_of_layers_not_selected(global_state):
    keep = 0.3
    strategy = fedp3(selection="opu2", global_keep=keep)
    plan = strategy.plan(3, 0, 10)  # selects layers 0 and 3
    builder = DownloadBuilder(global_state, codec.ValueDtype.FLOAT32)
    decoded = codec.decode(builder.payload(plan, device_has_private_copy=False),
                           expected_shapes=tensor_shapes(SPEC))
    assert set(decoded) == set(tensor_shapes(SPEC))
    selected = layer_names((0, 3))
    for name, tensor in decoded.items():
        values = global_state[name]
        assert tensor.shape == values.shape
        if name in selected or name in OUTPUT or values.ndim < 2:
            assert tensor.indices is None or tensor.nnz == values.size, name  # dense
            np.testing.assert_array_equal(tensor.to_dense(), values)
        else:
            assert name in layer_names((1, 2))
            assert tensor.nnz == math.ceil(keep * values.size), name
            flat = values.ravel()
            np.testing.assert_array_equal(tensor.values, flat[tensor.indices])
            np.testing.assert_array_equal(np.flatnonzero(magnitude_mask(values, keep)), tensor.indices)
    # the pruned layers' biases are sent dense
    for bias in ("layers.1.conv.bias", "layers.2.linear.bias"):
        assert decoded[bias].nnz == global_state[bias].size
        np.testing.assert_array_equal(decoded[bias].to_dense(), global_state[bias])


def test_private_tensors_are_sent_only_to_a_device_without_its_copy(global_state):
    plan = fedp3(selection="lowerb").plan(1, 0, 10)
    builder = DownloadBuilder(global_state, codec.ValueDtype.FLOAT32)
    with_copy = codec.decode(builder.payload(plan, device_has_private_copy=True))
    without_copy = codec.decode(builder.payload(plan, device_has_private_copy=False))
    assert set(with_copy) == set(tensor_shapes(SPEC)) - OUTPUT
    assert set(without_copy) == set(tensor_shapes(SPEC))
    for name in OUTPUT:
        np.testing.assert_array_equal(without_copy[name].to_dense(), global_state[name])
    # not private: always sent
    shared = fedp3(selection="lowerb", personal_head=False).plan(1, 0, 10)
    assert set(codec.decode(builder.payload(shared, device_has_private_copy=True))) == set(tensor_shapes(SPEC))


def test_each_distinct_download_is_encoded_once_and_pruning_shrinks_it(global_state):
    builder = DownloadBuilder(global_state, codec.ValueDtype.FLOAT32)
    full = fedp3(selection="opu2", global_keep=1.0)
    a = builder.payload(full.plan(1, 0, 10), device_has_private_copy=True)
    b = builder.payload(full.plan(5, 0, 99), device_has_private_copy=True)  # same group, same plan
    assert a is b
    # with no global pruning every group downloads the same thing, so it is encoded once
    assert builder.payload(full.plan(2, 0, 10), device_has_private_copy=True) is a
    assert builder.payload(full.plan(2, 0, 10), device_has_private_copy=False) is not a
    fedavg = FedAvg(SPEC)
    assert builder.payload(fedavg.plan(0, 0, 3), False) is builder.payload(fedavg.plan(9, 0, 40), False)

    half = fedp3(selection="opu2", global_keep=0.5)
    small = builder.payload(half.plan(1, 0, 10), device_has_private_copy=True)
    assert builder.payload(half.plan(5, 3, 10), device_has_private_copy=True) is small
    other_group = builder.payload(half.plan(2, 0, 10), device_has_private_copy=True)
    assert other_group is not small and other_group != small
    assert len(small) < len(a)
    # the non-selected layers carry about half their weights: well under the dense payload
    dense_non_selected = sum(global_state[n].nbytes for n in layer_names((0, 3)))
    assert len(a) - len(small) > 0.35 * dense_non_selected
