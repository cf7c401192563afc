"""Per-device export of personalized submodels (ONNX, TFLite): issue 4."""
