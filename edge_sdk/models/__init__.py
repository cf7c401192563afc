"""Model specs and the networks built from them (shared by devices and the coordinator)."""

from .network import SpecModel, build_model, layer_tensor_names, tensor_shapes
from .spec import LayerSpec, ModelSpec, SpecError
from .zoo import MODELS, model_spec

__all__ = ["LayerSpec", "ModelSpec", "SpecError", "SpecModel", "build_model", "layer_tensor_names",
           "tensor_shapes", "MODELS", "model_spec"]
