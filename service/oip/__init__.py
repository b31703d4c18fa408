"""The Open Inference Protocol (OIP, also called KServe v2: what Triton and KServe speak), as two thin
front doors on the same core as ``/classify``: the same repository, admission, batchers, deadline,
metrics and limits, and no copy of the path.

Where each piece lives:

* ``tensors.py``: datatypes, shapes and element counts, the binary tensor data extension (a body
  split at ``Inference-Header-Content-Length``, ``binary_data_size``, BYTES elements as a 4-byte
  little-endian length and the bytes) and the classification extension (``"score:index:label"``);
  errors are :class:`~service.oip.tensors.TensorFormatError`.
* ``model.py``: what the server and each model say about themselves: server metadata (with the
  extensions), model metadata (inputs ``image`` BYTES ``[-1]`` and ``input`` FP32 ``[-1, 3, H, W]``,
  output ``logits`` FP32 ``[-1, classes]``, platform ``onnx_onnxv1``, version ``"1"``) and Triton's
  model configuration.
* ``infer.py``: protocol-neutral inference. A front door decodes its wire format into an
  :class:`~service.oip.infer.InferenceRequest` (:class:`~service.oip.infer.InputTensor`,
  :class:`~service.oip.infer.RequestedOutput`), finds the model with
  :func:`~service.oip.infer.served_model`, and calls :func:`~service.oip.infer.infer` (holding a place
  in the model's line) or :func:`~service.oip.infer.admit_and_infer`; it gets an
  :class:`~service.oip.infer.InferenceResponse` of :class:`~service.oip.infer.OutputTensor`. Every
  failure is an :class:`~service.oip.infer.OipError` whose ``kind`` maps, in the one table
  :data:`~service.oip.infer.STATUS`, to an HTTP status and a gRPC status code.
* ``http.py``: the HTTP routes under ``/v2``, dispatched straight from the ASGI stack as ``/classify``
  is, with errors as ``{"error": "<message>"}``.
* ``grpc.py``: the gRPC service ``inference.GRPCInferenceService`` (grpc.aio, in the HTTP server's
  event loop), on ``GRPC_PORT``.

Requests that infer are counted in the ``classifier_*`` series under their model, like ``/classify``'s,
and in ``classifier_protocol_requests_total`` by protocol (``Metrics.observe_request(..., protocol=)``).
"""
