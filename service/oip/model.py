"""What the Open Inference Protocol says about this server and its models: metadata and configuration.

Every model offers a client two inputs, of which a request uses one:

* ``image``: ``BYTES`` of shape ``[-1]`` (``[-1, 1]`` is accepted too), one encoded image per element
  (JPEG, PNG, WebP, BMP, GIF or TIFF), decoded and preprocessed by the server exactly as ``/classify``
  does it;
* ``input``: ``FP32`` of shape ``[-1, 3, H, W]``, images already preprocessed as the manifest says,
  which skips the decode.

and one output, ``logits`` (``FP32``, ``[-1, classes]``), which the classification extension turns into
the top classes. A model lists the versions ready to serve; a request that names none gets the one
the model serves by default (service/core/repository.py).

The configuration is Triton's shape (``max_batch_size``, ``input``, ``output``, ``dynamic_batching``,
``instance_group``), filled from what the model's batcher really does, so Triton's tools can read it.
"""

from __future__ import annotations

from importlib import metadata

from service.core.repository import ServedModel
from service.oip.tensors import BYTES, FP32

SERVER_NAME = "efficient-cnn-classifier"
# Model Metadata's platform for an ONNX model, from the protocol's list of platform names.
PLATFORM = "onnx_onnxv1"
IMAGE_INPUT = "image"
TENSOR_INPUT = "input"
LOGITS_OUTPUT = "logits"
# What GET /v2 advertises: Triton's names for the extensions served here.
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration")


def server_version() -> str:
    try:
        return metadata.version("efficient-cnn-service")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}


def input_size(served: ServedModel) -> int:
    """The side of the square input the model takes (the preprocessing's crop)."""
    assert served.manifest is not None
    return served.manifest.preprocessing.crop


def classes(served: ServedModel) -> int:
    assert served.manifest is not None
    return len(served.manifest.labels)


def model_metadata(served: ServedModel, versions: list[int]) -> dict:
    """Model Metadata for a model whose manifest has been read; ``versions``: those ready to serve."""
    size = input_size(served)
    return {
        "name": served.name,
        "versions": [str(version) for version in versions],
        "platform": PLATFORM,
        "inputs": [
            {"name": IMAGE_INPUT, "datatype": BYTES, "shape": [-1]},
            {"name": TENSOR_INPUT, "datatype": FP32, "shape": [-1, 3, size, size]},
        ],
        "outputs": [{"name": LOGITS_OUTPUT, "datatype": FP32, "shape": [-1, classes(served)]}],
    }


def model_config(served: ServedModel, *, versions: list[int], request_timeout_s: float) -> dict:
    """Triton's model configuration for a model that is being served (it has a batcher)."""
    batcher = served.batcher
    runtime = served.runtime
    assert batcher is not None and runtime is not None
    size = input_size(served)
    tensorrt = runtime.name == "tensorrt"
    return {
        "name": served.name,
        "platform": "tensorrt_plan" if tensorrt else "onnxruntime_onnx",
        "backend": "tensorrt" if tensorrt else "onnxruntime",
        # The most images one request may carry: every one takes a place in the model's queue.
        "max_batch_size": batcher.max_queue_size,
        "input": [
            # One encoded image per batch entry: Triton spells a [-1] tensor as dims [1] reshaped to [].
            {"name": IMAGE_INPUT, "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}},
            {
                "name": TENSOR_INPUT,
                "data_type": "TYPE_FP32",
                "format": "FORMAT_NCHW",
                "dims": [3, size, size],
            },
        ],
        "output": [{"name": LOGITS_OUTPUT, "data_type": "TYPE_FP32", "dims": [classes(served)]}],
        "dynamic_batching": {
            "preferred_batch_size": [batcher.max_batch_size],
            "max_queue_delay_microseconds": round(batcher.max_queue_delay_s * 1_000_000),
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": round(request_timeout_s * 1_000_000),
                "max_queue_size": batcher.max_queue_size,
            },
        },
        "instance_group": [
            {
                "count": batcher.max_concurrent_batches,
                "kind": "KIND_CPU" if runtime.name == "onnxruntime-cpu" else "KIND_GPU",
            }
        ],
        "version_policy": {"specific": {"versions": versions}},
    }
