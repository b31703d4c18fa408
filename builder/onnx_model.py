"""One model of the repository: weights resolved, ONNX exported and checked, manifest written.

``<out>/<name>/{model.onnx, model.json}``: the export is checked with onnx.checker and against PyTorch
through ONNX Runtime, and published (renamed into place) only when they agree. A model whose outputs
are up to date is skipped (:mod:`builder.staleness`); a machine without PyTorch keeps the models
exported elsewhere, once they check out against their manifests.
"""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from pathlib import Path

from builder.report import Row, weights_label
from builder.staleness import up_to_date
from contract import zoo
from contract.layout import model_directory
from contract.manifest import (
    MANIFEST_FILE,
    ONNX_FILES,
    Manifest,
    OnnxFile,
    TensorSpec,
    WeightsProvenance,
    file_matches,
    sha256_of,
)

PARITY_TOLERANCE = 1e-4
RANDOM_SEED = 0


def build_model(name: str, args: argparse.Namespace, opset: int, tools: dict) -> Row:
    """Export, check and describe one model; skipped when its outputs are up to date."""
    import torch

    import models
    from builder import export, weights
    from models import complexity

    spec = zoo.parse(name)
    model_dir = model_directory(args.out, name, args.version)
    state_dict, provenance = weights.resolve(name, args.weights)
    if provenance["source"] == "random":
        extra = f"torch seed {RANDOM_SEED}, BatchNorm statistics calibrated on random input"
        provenance["note"] = "; ".join(filter(None, [provenance["note"], extra]))
    provenance_model = WeightsProvenance(**provenance)
    cost = complexity.count(spec.variant)
    row = Row(
        name=name,
        status="built",
        flops=cost.flops,
        params=cost.params,
        mac=cost.memory_access_cost,
        weights=weights_label(provenance_model),
    )

    if not args.force and up_to_date(model_dir, spec.variant, provenance_model, opset, tools):
        manifest = Manifest.load(model_dir)
        row.status, row.onnx_bytes, row.parity = (
            "up to date",
            manifest.onnx.bytes,
            manifest.parity_max_abs_diff,
        )
        return row

    torch.manual_seed(RANDOM_SEED)
    module = models.create(spec.variant)
    if state_dict is not None:
        module.load_state_dict(state_dict, strict=True)
    else:
        weights.calibrate_batchnorm(module, spec.input_shape, seed=RANDOM_SEED)
    module.eval()

    model_dir.mkdir(parents=True, exist_ok=True)
    onnx_file = ONNX_FILES["fp32"]
    staging = model_dir / f".{onnx_file}.building"
    try:
        export.export_onnx(module, spec, staging, opset=opset)
        row.parity = export.parity(module, staging, batch_sizes=(1, 4))
        if row.parity > PARITY_TOLERANCE:
            row.status = "FAILED"
            row.error = f"ONNX Runtime and PyTorch differ by {row.parity:.2e} > {PARITY_TOLERANCE:.0e}"
            return row
        final = model_dir / onnx_file
        os.replace(staging, final)
    finally:
        staging.unlink(missing_ok=True)

    row.onnx_bytes = final.stat().st_size
    manifest = Manifest(
        name=name,
        variant=spec.variant,
        family=spec.family,
        knobs=spec.knobs,
        input_size=spec.resolution,
        input=TensorSpec(name=export.INPUT_NAME, shape=[export.BATCH_DIM, *spec.input_shape]),
        output=TensorSpec(name=export.OUTPUT_NAME, shape=[export.BATCH_DIM, len(zoo.imagenet_labels())]),
        preprocessing=spec.preprocessing,
        flops=cost.flops,
        params=cost.params,
        memory_access_cost=cost.memory_access_cost,
        fp32_bytes=cost.fp32_bytes,
        weights=provenance_model,
        labels=list(zoo.imagenet_labels()),
        onnx=OnnxFile(file=onnx_file, sha256=sha256_of(final), bytes=row.onnx_bytes, opset=opset),
        parity_max_abs_diff=row.parity,
        tools=tools,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    manifest = _carry_over(model_dir, manifest)
    manifest.save(model_dir)
    return row


def existing_model(name: str, args: argparse.Namespace) -> Row:
    """A model exported elsewhere (no PyTorch here): its manifest and intact ONNX file, or FAILED."""
    model_dir: Path = model_directory(args.out, name, args.version)
    row = Row(name=name, status="FAILED")
    try:
        manifest = Manifest.load(model_dir)
    except (OSError, ValueError) as exc:
        row.error = (
            f"no usable {model_dir}/{MANIFEST_FILE} ({type(exc).__name__}) and PyTorch is not installed to "
            "export it: build it where PyTorch is (pip install '.[build]') and copy the model directory here"
        )
        return row
    onnx_path = model_dir / manifest.onnx.file
    if not file_matches(onnx_path, manifest.onnx.sha256, manifest.onnx.bytes):
        row.error = (
            f"{onnx_path} is missing or does not match its manifest, and PyTorch is not installed to "
            "re-export it"
        )
        return row
    row.status, row.flops, row.params, row.mac = (
        "kept",
        manifest.flops,
        manifest.params,
        manifest.memory_access_cost,
    )
    row.onnx_bytes, row.parity = manifest.onnx.bytes, manifest.parity_max_abs_diff
    row.weights = weights_label(manifest.weights)
    return row


def _carry_over(model_dir: Path, manifest: Manifest) -> Manifest:
    """Keep the earlier manifest's variants and engines that were made from this very ONNX file
    (a forced rebuild of a seeded export reproduces it); drop the rest, which are stale."""
    try:
        previous = Manifest.load(model_dir)
    except (OSError, ValueError):
        return manifest
    variants = [v for v in previous.precisions if v.source_sha256 == manifest.onnx.sha256]
    sources = {manifest.onnx.sha256, *(v.onnx.sha256 for v in variants)}
    engines = [e for e in previous.engines if e.source_sha256 in sources]
    return manifest.model_copy(update={"precisions": variants, "engines": engines})
