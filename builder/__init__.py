"""The build step behind ``build_engines.py``: PyTorch networks -> the model repository.

Export to ONNX, reduced-precision variants, TensorRT engines, and the manifest each writes
(``contract.manifest``). Needs torch (``.[build]``); the server never imports it.
"""
