"""Where the run time goes, by operator kind: the ShuffleNet v2 paper's Figure 2 on this hardware.

    python -m benchmarks.experiments.decomposition --repository model_repository [--models ...] [--runs N]

Ma et al., "ShuffleNet V2" (ECCV 2018), Figure 2: FLOPs count only the convolutions, yet element-wise
operations, data movement and channel shuffle take a real share of the time. Here each built model
runs under ONNX Runtime's profiler, with the session options the server uses and batch 1, and every
kernel's time is put in one of these kinds:

- ``convolution``: Conv, FusedConv and the FC layer (Gemm/MatMul). With the server's settings ONNX
  Runtime fuses the ReLU or ReLU6 after a convolution, and the residual addition before it, into
  the convolution kernel, and batch norm was folded into the weights at export, so their cost
  shows up here, not under element-wise;
- ``element-wise``: what is left of activations, additions, multiplications, BatchNormalization;
- ``data movement``: Concat, Split, Slice, Reshape, Transpose (outside a shuffle), and the layout
  conversions ONNX Runtime inserts around its blocked-layout (NCHWc) kernels;
- ``shuffle``: channel shuffle, i.e. each Transpose together with the Reshapes on either side of it;
- ``pooling``: MaxPool, AveragePool, global pooling and ReduceMean;
- ``other``: anything else.

``optimization="basic"`` profiles the same model with ONNX Runtime's basic graph rewrites only (no
activation or addition fused into a convolution, no blocked layout), which is closer to the
runtimes the paper measured: the element-wise share then appears on its own.

The profile names the nodes of the optimised graph, so the shuffle pattern is found in that graph
(saved by the same session). Only the measured runs count; the warm-up runs are dropped. The time
between kernels (the executor's own work) is reported apart, as ``overhead``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from benchmarks.experiments import print_rows

KINDS = ("convolution", "element-wise", "data movement", "shuffle", "pooling", "other")

_KIND_OF_OP = {
    **dict.fromkeys(
        (
            "Conv",
            "FusedConv",
            "ConvInteger",
            "QLinearConv",
            "NhwcConv",
            "Gemm",
            "FusedGemm",
            "MatMul",
            "FusedMatMul",
            "QLinearMatMul",
            "MatMulInteger",
            "ConvTranspose",
        ),
        "convolution",
    ),
    **dict.fromkeys(
        (
            "Relu",
            "Clip",
            "Add",
            "Sum",
            "Sub",
            "Mul",
            "Div",
            "BatchNormalization",
            "Sigmoid",
            "HardSigmoid",
            "HardSwish",
            "LeakyRelu",
            "Tanh",
            "Softmax",
            "Max",
            "Min",
            "Neg",
            "Exp",
            "PRelu",
            "QuantizeLinear",
            "DequantizeLinear",
        ),
        "element-wise",
    ),
    **dict.fromkeys(
        (
            "Concat",
            "Split",
            "Slice",
            "Reshape",
            "Transpose",
            "Flatten",
            "Squeeze",
            "Unsqueeze",
            "Gather",
            "Identity",
            "Pad",
            "Cast",
            "Expand",
            "Tile",
            "ReorderInput",
            "ReorderOutput",
            "Shape",
        ),
        "data movement",
    ),
    **dict.fromkeys(
        ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax"),
        "pooling",
    ),
}


def kind_of(op_type: str) -> str:
    return _KIND_OF_OP.get(op_type, "other")


def shuffle_nodes(graph: onnx.GraphProto) -> set[str]:
    """Names of the nodes that make up channel shuffles: each Transpose and its adjacent Reshapes.

    A channel shuffle exports as Reshape (N, g, C/g, H, W) -> Transpose(1, 2) -> Reshape (N, C, H, W);
    none of these networks transposes anything else.
    """
    producer = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    found = set()
    for node in graph.node:
        if node.op_type != "Transpose":
            continue
        before = producer.get(node.input[0])
        after = [c for output in node.output for c in consumers[output]]
        reshapes = [n for n in [before, *after] if n is not None and n.op_type == "Reshape"]
        if reshapes:
            found.add(node.name)
            found.update(n.name for n in reshapes)
    return found


@dataclass(frozen=True)
class Decomposition:
    model: str
    optimization: str  # ONNX Runtime graph optimisation level: "all" (as served) or "basic"
    runs: int
    run_ms: float  # mean wall time of one profiled run (model_run)
    kernel_ms: dict[str, float]  # kind -> mean ms per run
    share: dict[str, float]  # kind -> fraction of the kernels' total
    overhead_ms: float  # run_ms minus the kernels' total
    by_op: dict[str, float]  # op type -> mean ms per run

    def to_dict(self) -> dict:
        return asdict(self)


OPTIMIZATIONS = ("all", "basic")


def profile(
    model_path: Path,
    *,
    runs: int = 30,
    warmup: int = 5,
    intra_op_threads: int = 1,
    optimization: str = "all",
) -> Decomposition:
    """Profile ``runs`` batch-1 runs of the ONNX model at ``model_path`` through the service's backend.

    ``optimization``: "all" is the server's graph optimisation level; "basic" leaves the element-wise
    operations unfused.
    """
    if optimization not in OPTIMIZATIONS:
        raise ValueError(f"optimization must be one of {OPTIMIZATIONS}, got {optimization!r}")
    import onnxruntime as ort

    from contract.manifest import Manifest
    from service.core.runtimes.base import RuntimeOptions
    from service.core.runtimes.ort import PROVIDERS, OrtRuntime, _session_options

    model_path = Path(model_path)
    manifest = Manifest.load(model_path.parent)
    with tempfile.TemporaryDirectory(prefix="decomposition-") as tmp:
        options = _session_options(RuntimeOptions(intra_op_threads=intra_op_threads))
        if optimization == "basic":
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        optimised_path = Path(tmp) / "optimised.onnx"
        options.optimized_model_filepath = str(optimised_path)
        session = ort.InferenceSession(str(model_path), options, providers=list(PROVIDERS["onnxruntime-cpu"]))
        runtime = OrtRuntime(session, "onnxruntime-cpu", "fp32")
        crop = manifest.preprocessing.crop
        inputs = np.random.default_rng(0).standard_normal((1, 3, crop, crop), dtype=np.float32)
        for _ in range(warmup + runs):
            runtime.run(inputs)
        events = json.loads(Path(session.end_profiling()).read_text())
        graph = onnx.load(str(optimised_path), load_external_data=False).graph
    return decompose(manifest.name, events, graph, warmup=warmup, optimization=optimization)


def decompose(
    model: str, events: list[dict], graph: onnx.GraphProto, *, warmup: int, optimization: str = "all"
) -> Decomposition:
    """Kernel time by kind from a profile's events, dropping the first ``warmup`` runs."""
    run_events = sorted(
        (e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"]
    )
    measured = run_events[warmup:]
    if not measured:
        raise ValueError(f"{model}: the profile has {len(run_events)} runs, none after {warmup} warm-up runs")
    since = measured[0]["ts"]
    shuffles = shuffle_nodes(graph)
    per_kind: dict[str, float] = dict.fromkeys(KINDS, 0.0)
    per_op: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time") or event["ts"] < since:
            continue
        node = event["name"].removesuffix("_kernel_time")
        op = event.get("args", {}).get("op_name", "?")
        kind = "shuffle" if node in shuffles else kind_of(op)
        per_kind[kind] += event["dur"]
        per_op[op] += event["dur"]
    runs = len(measured)
    total = sum(per_kind.values())
    run_us = sum(e["dur"] for e in measured) / runs
    return Decomposition(
        model=model,
        optimization=optimization,
        runs=runs,
        run_ms=run_us / 1000,
        kernel_ms={kind: us / runs / 1000 for kind, us in per_kind.items()},
        share={kind: (us / total if total else 0.0) for kind, us in per_kind.items()},
        overhead_ms=max(0.0, run_us - total / runs) / 1000,
        by_op={op: us / runs / 1000 for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])},
    )


def table(rows: list[Decomposition]) -> str:
    head = ["model", "graph", "run ms", *KINDS, "overhead ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        graph = "as served" if row.optimization == "all" else "unfused"
        cells = [row.model, graph, f"{row.run_ms:.2f}"]
        cells += [f"{100 * row.share[kind]:.1f}%" for kind in KINDS]
        cells.append(f"{row.overhead_ms:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.experiments.decomposition", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument(
        "--models", nargs="+", default=["mobilenet_v1", "mobilenet_v2", "shufflenet_v1", "shufflenet_v2"]
    )
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument(
        "--optimization",
        nargs="+",
        default=list(OPTIMIZATIONS),
        choices=OPTIMIZATIONS,
        help="graph optimisation levels to profile: all (as served), basic (unfused)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for model in args.models:
        for level in args.optimization:
            print(f"profiling {model} ({level})", file=sys.stderr)
            path = args.repository / model / "model.onnx"
            rows.append(profile(path, runs=args.runs, intra_op_threads=args.threads, optimization=level))
    print_rows(table(rows), rows, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
