"""The contract between the build step and the server, torch-free so that both sides import it.

``contract.zoo``: the one table of model families, and every servable name, knob, preprocessing and
published checkpoint derived from it.
``contract.preprocessing``: how an image becomes a network's input.
``contract.manifest``: ``model.json``, the names of the files a model directory holds, and their verification.
``contract.gpu``: which GPU this is (for TensorRT engines) and the batch GPU serving is tuned for.
``contract.photos``: deterministic synthetic photos (calibration, tests, benchmarks).
Nothing here imports ``models``, ``builder``, ``service`` or ``benchmarks``.
"""
