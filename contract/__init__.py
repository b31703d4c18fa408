"""The contract between the build step and the server, torch-free so that both sides import it.

``contract.zoo``: every servable model name, its family, knobs, preprocessing and published weights.
``contract.manifest``: ``model.json`` and the files a model directory holds, with their verification.
``contract.photos``: deterministic synthetic photos (calibration, tests, benchmarks).
Nothing here imports ``models``, ``builder``, ``service`` or ``benchmarks``.
"""
