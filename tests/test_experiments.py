"""The ShuffleNet v2 experiments: guideline 1's networks (equal FLOPs, the paper's MAC) and the run-time
decomposition by operator kind from ONNX Runtime's profiler."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from benchmarks.experiments import decomposition, guideline1

HW = guideline1.SIDE * guideline1.SIDE


# --- guideline 1 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("width", guideline1.WIDTHS)
def test_guideline1_configurations_of_a_width_have_exactly_equal_flops(width):
    configs = [c for c in guideline1.configs() if c.width == width]
    assert [c.ratio for c in configs] == ["1:1", "1:2", "1:6", "1:12"]
    # Counted from the built graphs, not from the table of channel counts.
    flops = {c.ratio: guideline1.graph_cost(guideline1.build(c))[0] for c in configs}
    assert len(set(flops.values())) == 1, flops
    assert flops["1:1"] == guideline1.BLOCKS * 2 * HW * 4900 * width * width
    for c in configs:
        nominal = int(c.ratio.split(":")[1])
        assert c.c2 / c.c1 == pytest.approx(nominal, rel=0.05), c


def test_guideline1_widths_scale_every_channel():
    by_key = {(c.ratio, c.width): c for c in guideline1.configs()}
    for ratio, (c1, c2) in guideline1.PAIRS.items():
        for width in (2, 4):
            assert (by_key[(ratio, width)].c1, by_key[(ratio, width)].c2) == (c1 * width, c2 * width)


@pytest.mark.parametrize("config", guideline1.configs(), ids=lambda c: c.name)
def test_guideline1_mac_follows_the_papers_formula(config):
    flops, mac = guideline1.graph_cost(guideline1.build(config))
    c1, c2 = config.c1, config.c2
    # MAC = hw(c1 + c2) + c1*c2 per 1x1 convolution, two convolutions per block, ten blocks.
    assert mac == guideline1.paper_mac(config) == 10 * 2 * (HW * (c1 + c2) + c1 * c2)
    assert flops == guideline1.paper_flops(config)
    # ... and never below the bound 2*sqrt(hw*B) + B/hw, which only c1 = c2 reaches.
    bound = 20 * guideline1.mac_lower_bound(HW * c1 * c2)
    assert mac >= bound - 1e-6
    if c1 == c2:
        assert mac == pytest.approx(bound)


def test_guideline1_mac_grows_as_the_channels_grow_apart():
    for width in guideline1.WIDTHS:
        macs = [guideline1.paper_mac(c) for c in guideline1.configs() if c.width == width]
        assert macs == sorted(macs) and macs[0] < macs[-1]


def test_guideline1_costs_agree_with_the_projects_own_counter():
    torch = pytest.importorskip("torch")
    from models.complexity import layer_costs

    config = guideline1.configs()[1]  # 1:2 at x1
    layers = []
    for _ in range(guideline1.BLOCKS):
        layers += [
            torch.nn.Conv2d(config.c1, config.c2, 1, bias=False),
            torch.nn.ReLU(),
            torch.nn.Conv2d(config.c2, config.c1, 1, bias=False),
            torch.nn.ReLU(),
        ]
    rows = layer_costs(torch.nn.Sequential(*layers), (config.c1, guideline1.SIDE, guideline1.SIDE))
    flops, mac = guideline1.graph_cost(guideline1.build(config))
    assert sum(r.flops for r in rows) == flops
    assert sum(r.memory_access_cost for r in rows) == mac


def test_guideline1_network_computes_what_it_says_through_the_service_runtime():
    config = guideline1.Config("1:2", 1, 4, 8)
    model = guideline1.build(config)
    runtime = guideline1.runtime_for(model)
    assert runtime.name == "onnxruntime-cpu"
    x = np.random.default_rng(3).standard_normal((2, 4, guideline1.SIDE, guideline1.SIDE), dtype=np.float32)
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    expected = x
    for block in range(guideline1.BLOCKS):
        for step in range(2):
            w = weights[f"block{block}.conv{step}.weight"][:, :, 0, 0]
            expected = np.maximum(np.einsum("oc,nchw->nohw", w, expected), 0)
    np.testing.assert_allclose(runtime.run(x), expected, rtol=1e-4, atol=1e-4)


def test_guideline1_run_and_table_in_the_papers_layout():
    rows = guideline1.run(widths=(1,), duration_s=0.02, repeats=2)
    assert [(r.ratio, r.width) for r in rows] == [(ratio, 1) for ratio in guideline1.PAIRS]
    assert all(r.images_per_s.median > 0 and len(r.images_per_s.values) == 2 for r in rows)
    lines = guideline1.table(rows).splitlines()
    assert lines[0].startswith("| c1:c2 | (c1,c2) for x1 | img/s x1 | MAC (M) x1 | MFLOPs x1 |")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| 1:1", "| 1:2", "| 1:6", "| 1:12"]
    assert "| (20,245) |" in lines[-1]


def test_guideline1_command_prints_the_table_and_writes_the_rows(tmp_path, capsys):
    out = tmp_path / "guideline1.json"
    argv = ["--widths", "1", "--duration", "0.02", "--repeats", "1", "--json", str(out)]
    assert guideline1.main(argv) == 0
    assert capsys.readouterr().out.startswith("| c1:c2 |")
    rows = json.loads(out.read_text())
    assert [(row["ratio"], row["width"]) for row in rows] == [(ratio, 1) for ratio in guideline1.PAIRS]


# --- decomposition ---------------------------------------------------------------------------------


def _node(op: str, inputs: list[str], output: str) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], name=f"n_{output}")


def _shuffle_graph() -> onnx.GraphProto:
    nodes = [
        _node("Conv", ["x", "w"], "a"),
        _node("Concat", ["a", "a"], "b"),
        _node("Reshape", ["b", "s1"], "c"),
        _node("Transpose", ["c"], "d"),
        _node("Reshape", ["d", "s2"], "e"),
        _node("Relu", ["e"], "g"),
        _node("Transpose", ["g"], "f"),  # no reshape beside it: plain data movement
    ]
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    return helper.make_graph(
        nodes, "g", [value], [helper.make_tensor_value_info("f", TensorProto.FLOAT, [1])]
    )


def test_shuffle_is_a_transpose_with_its_reshapes():
    assert decomposition.shuffle_nodes(_shuffle_graph()) == {"n_c", "n_d", "n_e"}


def test_kinds_of_operators():
    assert decomposition.kind_of("FusedConv") == "convolution"
    assert decomposition.kind_of("Gemm") == "convolution"
    assert decomposition.kind_of("Add") == "element-wise"
    assert decomposition.kind_of("ReorderInput") == "data movement"
    assert decomposition.kind_of("GlobalAveragePool") == "pooling"
    assert decomposition.kind_of("NonMaxSuppression") == "other"


def _event(name: str, op: str, ts: int, dur: int) -> dict:
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}


def test_decompose_drops_the_warmup_and_shares_the_kernels_time():
    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 1000},  # warm-up
        _event("n_a", "Conv", 10, 900),
        {"cat": "Session", "name": "model_run", "ts": 2000, "dur": 120},
        _event("n_a", "Conv", 2001, 60),
        _event("n_b", "Concat", 2061, 10),
        _event("n_c", "Reshape", 2071, 5),
        _event("n_d", "Transpose", 2076, 10),
        _event("n_e", "Reshape", 2086, 5),
        _event("n_g", "Relu", 2091, 10),
    ]
    result = decomposition.decompose("m", events, _shuffle_graph(), warmup=1)
    assert result.runs == 1 and result.run_ms == pytest.approx(0.12)
    assert result.kernel_ms["convolution"] == pytest.approx(0.06)
    assert result.share["shuffle"] == pytest.approx(20 / 100)
    assert result.share["data movement"] == pytest.approx(10 / 100)
    assert result.share["element-wise"] == pytest.approx(10 / 100)
    assert sum(result.share.values()) == pytest.approx(1)
    assert result.overhead_ms == pytest.approx(0.02)
    with pytest.raises(ValueError, match="warm-up"):
        decomposition.decompose("m", events, _shuffle_graph(), warmup=2)


def test_profiles_of_the_built_models(built_repository):
    shuffle = decomposition.profile(built_repository / "shufflenet_v2" / "model.onnx", runs=3, warmup=1)
    assert shuffle.model == "shufflenet_v2" and shuffle.runs == 3
    assert sum(shuffle.share.values()) == pytest.approx(1)
    assert max(shuffle.share, key=shuffle.share.get) == "convolution"
    assert shuffle.share["shuffle"] > 0 and shuffle.share["data movement"] > 0  # concat and split
    mobile = decomposition.profile(built_repository / "mobilenet_v2" / "model.onnx", runs=3, warmup=1)
    assert mobile.share["shuffle"] == 0
    unfused = decomposition.profile(
        built_repository / "mobilenet_v2" / "model.onnx", runs=3, warmup=1, optimization="basic"
    )
    # Unfused, the residual additions and ReLU6 run as kernels of their own.
    assert unfused.share["element-wise"] > mobile.share["element-wise"]
    assert unfused.by_op.get("Add", 0) > 0
    table = decomposition.table([shuffle, unfused])
    assert "| shufflenet_v2 | as served |" in table and "| mobilenet_v2 | unfused |" in table
