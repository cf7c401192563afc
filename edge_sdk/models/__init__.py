"""Registered models and the networks built from them (shared by devices and the coordinator)."""

from .network import build_model, check_structure, layer_tensor_names, model_spec, structure, tensor_shapes
from .registry import allow_reference, model_names, register_model
from .spec import ModelSpec, SpecError

__all__ = ["ModelSpec", "SpecError", "allow_reference", "build_model", "check_structure",
           "layer_tensor_names", "model_names", "model_spec", "register_model", "structure",
           "tensor_shapes"]
