"""What the build tells its user: one row per model, a closing table, a line per variant and engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from contract.manifest import PrecisionVariant, WeightsProvenance

if TYPE_CHECKING:
    from builder.tensorrt import BuildPlan, BuiltEngine


@dataclass
class Row:
    """One line of the closing table."""

    name: str
    status: str  # "built", "up to date", "kept" (exported elsewhere, no PyTorch here) or "FAILED"
    flops: int = 0
    params: int = 0
    mac: int = 0
    onnx_bytes: int = 0
    parity: float | None = None
    weights: str = ""
    error: str = ""
    # one line per reduced-precision variant and per engine, printed under the table
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status != "FAILED"


def weights_label(weights: WeightsProvenance) -> str:
    """The weights column: where the weights came from, loudly when they are random."""
    if weights.source == "imagenet":
        return f"imagenet ({weights.sha256[:8]})" if weights.sha256 else "imagenet"
    if weights.source == "file":
        return f"file {Path(weights.path or '').name}"
    return "RANDOM"


def variant_line(name: str, variant: PrecisionVariant, status: str) -> str:
    recipe = f", {variant.recipe} recipe" if variant.recipe else ""
    return (
        f"{name}:{variant.precision} {status}: {variant.onnx.file} "
        f"({variant.onnx.bytes / 1e6:.2f} MB{recipe}); "
        f"vs fp32 on {variant.held_out}: top-1 agreement {variant.top1_agreement:.1%}, "
        f"max |logit diff| {variant.max_abs_logit_diff:.3g}, mean {variant.mean_abs_logit_diff:.3g}"
    )


def engine_line(name: str, built: BuiltEngine, plan: BuildPlan) -> str:
    status = "up to date" if built.skipped else f"built in {built.seconds:.0f} s"
    line = f"{name} {plan.precision} engine {status}: {built.record.file} (from {plan.onnx_file})"
    if built.record.gpu_fallback_layers is not None:
        fallback = built.record.gpu_fallback_layers
        line += f"; DLA core {plan.dla_core}, {len(fallback)} layer(s) fall back to the GPU"
        if fallback:
            line += ": " + ", ".join(fallback[:20]) + (" ..." if len(fallback) > 20 else "")
    return line


def format_table(rows: list[Row]) -> str:
    header = ("model", "status", "MFLOPs", "params (M)", "MAC (M)", "ONNX (MB)", "max |diff|", "weights")
    lines = [header]
    for r in rows:
        counted = r.flops > 0
        lines.append(
            (
                r.name,
                r.status,
                f"{r.flops / 1e6:.1f}" if counted else "-",
                f"{r.params / 1e6:.3f}" if counted else "-",
                f"{r.mac / 1e6:.1f}" if counted else "-",
                f"{r.onnx_bytes / 1e6:.2f}" if r.onnx_bytes else "-",
                f"{r.parity:.1e}" if r.parity is not None else "-",
                r.weights,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)
