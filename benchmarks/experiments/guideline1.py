"""ShuffleNet v2's guideline 1 on this hardware: at equal FLOPs, equal channel widths run fastest.

    python -m benchmarks.experiments.guideline1 [--duration S] [--repeats N] [--threads T] [--json PATH]

Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design" (ECCV 2018),
Sec. 2, G1 and Table 1. A 1x1 convolution from c1 to c2 channels on an h x w map costs
B = hw c1 c2 multiply-adds and reads and writes MAC = hw(c1 + c2) + c1 c2 elements, so by the
AM-GM inequality MAC >= 2 sqrt(hw B) + B / hw, with equality at c1 = c2. The test network is the
paper's: 10 blocks of two 1x1 convolutions (c1 -> c2, c2 -> c1) on a 56x56 input, with c1:c2 at
1:1, 1:2, 1:6 and 1:12 and the FLOPs held fixed, at widths x1, x2 and x4 (every channel count
doubled or quadrupled).

Channel counts. The paper's pairs were equal in FLOPs only to within 5% (e.g. 128x128 against
36x432). Here every pair of a width has exactly the same product c1 * c2 (4900 at x1), so FLOPs are
really equal; the price is ratios within 4% of the nominal ones (1:1.96, 1:6.25, 1:12.25). The x1
width (70 channels) sits between the paper's ARM (32) and GPU (128) baselines.

Each network is an ONNX graph (Conv + ReLU, no bias: the cost counts only the convolutions' weights)
run by the service's own ONNX Runtime backend with the server's session options, batch 1 and one
intra-op thread by default, as the paper's ARM column was measured on one thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks.experiments import print_rows
from benchmarks.inprocess import Spread

BLOCKS = 10
SIDE = 56  # input height and width
WIDTHS = (1, 2, 4)
# Ratio label -> (c1, c2) at width x1; every product is 4900.
PAIRS: dict[str, tuple[int, int]] = {
    "1:1": (70, 70),
    "1:2": (50, 98),
    "1:6": (28, 175),
    "1:12": (20, 245),
}
OPSET = 17


@dataclass(frozen=True)
class Config:
    ratio: str
    width: int
    c1: int
    c2: int

    @property
    def name(self) -> str:
        return f"g1_{self.ratio.replace(':', 'to')}_x{self.width}"


def configs(widths: tuple[int, ...] = WIDTHS) -> list[Config]:
    return [
        Config(ratio, width, c1 * width, c2 * width) for width in widths for ratio, (c1, c2) in PAIRS.items()
    ]


# ---------------------------------------------------------------------------------------------
# Cost: what the paper says it should be, and what the built graph actually holds


def paper_flops(config: Config) -> int:
    """B per 1x1 conv is hw c1 c2; two convolutions per block."""
    return BLOCKS * 2 * SIDE * SIDE * config.c1 * config.c2


def paper_mac(config: Config) -> int:
    """MAC per 1x1 conv is hw(c1 + c2) + c1 c2 (ShuffleNet v2, Sec. 2, G1); two per block."""
    hw = SIDE * SIDE
    return BLOCKS * 2 * (hw * (config.c1 + config.c2) + config.c1 * config.c2)


def mac_lower_bound(flops_per_conv: int) -> float:
    """The paper's bound MAC >= 2 sqrt(hw B) + B / hw for one 1x1 conv of B multiply-adds."""
    hw = SIDE * SIDE
    return 2 * (hw * flops_per_conv) ** 0.5 + flops_per_conv / hw


def graph_cost(model: onnx.ModelProto) -> tuple[int, int]:
    """(FLOPs, MAC) counted from the graph itself: every Conv's weight shape and its feature maps.

    Counted the project's way (``models/complexity.py``): multiply-adds k*k*(Cin/groups)*Cout*H*W,
    and input map + output map + weights. Only stride-1, unpadded convolutions occur here, so the
    output map has the input's size.
    """
    weights = {init.name: tuple(init.dims) for init in model.graph.initializer}
    flops = mac = 0
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        c_out, c_in_per_group, kh, kw = weights[node.input[1]]
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        hw = SIDE * SIDE
        flops += c_out * c_in_per_group * kh * kw * hw
        mac += hw * (c_in_per_group * groups) + hw * c_out + c_out * c_in_per_group * kh * kw
    return flops, mac


# ---------------------------------------------------------------------------------------------
# The network


def build(config: Config, seed: int = 0) -> onnx.ModelProto:
    """10 blocks of Conv1x1(c1->c2) + ReLU + Conv1x1(c2->c1) + ReLU; input [batch, c1, 56, 56]."""
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    current = "input"
    for block in range(BLOCKS):
        for step, (c_in, c_out) in enumerate(((config.c1, config.c2), (config.c2, config.c1))):
            weight = f"block{block}.conv{step}.weight"
            scale = (2.0 / c_in) ** 0.5  # He init keeps activations finite through 20 layers
            values = rng.normal(0.0, scale, (c_out, c_in, 1, 1)).astype(np.float32)
            initializers.append(numpy_helper.from_array(values, weight))
            conv, relu = f"block{block}.conv{step}", f"block{block}.relu{step}"
            nodes.append(helper.make_node("Conv", [current, weight], [conv], name=conv, kernel_shape=[1, 1]))
            nodes.append(helper.make_node("Relu", [conv], [relu], name=relu))
            current = relu
    nodes.append(helper.make_node("Identity", [current], ["output"], name="output"))
    graph = helper.make_graph(
        nodes,
        config.name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", config.c1, SIDE, SIDE])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", config.c1, SIDE, SIDE])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def runtime_for(model: onnx.ModelProto, intra_op_threads: int = 1):
    """The service's ONNX Runtime backend on ``model``, with the server's session options."""
    import onnxruntime as ort

    from service.core.runtimes.base import RuntimeOptions
    from service.core.runtimes.ort import PROVIDERS, OrtRuntime, _session_options

    options = _session_options(RuntimeOptions(intra_op_threads=intra_op_threads))
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=list(PROVIDERS["onnxruntime-cpu"])
    )
    return OrtRuntime(session, "onnxruntime-cpu", "fp32")


# ---------------------------------------------------------------------------------------------
# Measurement


@dataclass(frozen=True)
class Row:
    ratio: str
    width: int
    c1: int
    c2: int
    flops: int
    memory_access_cost: int
    images_per_s: Spread
    runs: int

    def to_dict(self) -> dict:
        return asdict(self)


def measure(
    config: Config,
    *,
    duration_s: float = 1.0,
    repeats: int = 3,
    batch_size: int = 1,
    intra_op_threads: int = 1,
) -> Row:
    model = build(config)
    flops, mac = graph_cost(model)
    runtime = runtime_for(model, intra_op_threads)
    inputs = np.random.default_rng(1).standard_normal((batch_size, config.c1, SIDE, SIDE), dtype=np.float32)
    try:
        for _ in range(2):
            runtime.run(inputs)
        rates, runs = [], 0
        for _ in range(repeats):
            times = []
            stop_at = time.perf_counter() + duration_s
            while len(times) < 2 or time.perf_counter() < stop_at:
                started = time.perf_counter()
                runtime.run(inputs)
                times.append(time.perf_counter() - started)
            rates.append(batch_size / statistics.median(times))
            runs += len(times)
    finally:
        runtime.close()
    return Row(config.ratio, config.width, config.c1, config.c2, flops, mac, Spread.of(rates), runs)


def run(
    *,
    widths: tuple[int, ...] = WIDTHS,
    duration_s: float = 1.0,
    repeats: int = 3,
    batch_size: int = 1,
    intra_op_threads: int = 1,
    progress=None,
) -> list[Row]:
    rows = []
    for config in configs(widths):
        if progress:
            progress(f"guideline 1: {config.ratio} x{config.width}")
        rows.append(
            measure(
                config,
                duration_s=duration_s,
                repeats=repeats,
                batch_size=batch_size,
                intra_op_threads=intra_op_threads,
            )
        )
    return rows


def table(rows: list[Row]) -> str:
    """The paper's Table 1 layout (ratios down, widths across), plus MFLOPs and MAC per width."""
    widths = sorted({row.width for row in rows})
    by_key = {(row.ratio, row.width): row for row in rows}
    ratios = [ratio for ratio in PAIRS if any((ratio, w) in by_key for w in widths)]
    head = ["c1:c2", "(c1,c2) for x1"]
    head += [f"img/s x{w}" for w in widths]
    head += [f"MAC (M) x{w}" for w in widths]
    head += [f"MFLOPs x{w}" for w in widths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ratio in ratios:
        base = PAIRS[ratio]
        cells = [ratio, f"({base[0]},{base[1]})"]
        for w in widths:
            row = by_key.get((ratio, w))
            if row is None:
                cells.append("-")
                continue
            spread = row.images_per_s
            cells.append(f"{spread.median:.1f} ({spread.low:.1f}-{spread.high:.1f})")
        cells += [
            f"{by_key[(ratio, w)].memory_access_cost / 1e6:.2f}" if (ratio, w) in by_key else "-"
            for w in widths
        ]
        cells += [f"{by_key[(ratio, w)].flops / 1e6:.1f}" if (ratio, w) in by_key else "-" for w in widths]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.experiments.guideline1", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--widths", default="1,2,4", help="comma-separated width multipliers")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    widths = tuple(int(w) for w in args.widths.split(","))
    rows = run(
        widths=widths,
        duration_s=args.duration,
        repeats=args.repeats,
        batch_size=args.batch_size,
        intra_op_threads=args.threads,
        progress=lambda message: print(message, file=sys.stderr),
    )
    print_rows(table(rows), rows, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
