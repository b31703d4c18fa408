"""make tune: the search (benchmarks/tune_search.py) on synthetic cost functions with known optima, then
one short real tune of one model (python -m benchmarks.tune) whose file the server starts with."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from benchmarks import tune
from benchmarks.tune_search import Dimension, Sample, search
from service.model_config import read_model_config
from tests.live_server import ready_service

REPO = Path(__file__).resolve().parents[1]

# A space shaped like the CPU one: 3 x 4 x 2 x 4 x 4 = 384 points (312 once the queue delay is held
# where batches do not form), far more than the budgets below can measure.
SPACE = [
    Dimension("precision", ("fp32", "fp16", "int8")),
    Dimension("max_concurrent_batches", (3, 1, 2, 4)),
    Dimension("intra_op_threads", (1, 2)),
    Dimension("max_batch_size", (1, 2, 4, 8)),
    Dimension("max_queue_delay_ms", (0.0, 1.0, 2.0, 5.0), lambda c: c["max_batch_size"] > 1),
]
START = {
    "precision": "fp32",
    "max_concurrent_batches": 3,
    "intra_op_threads": 1,
    "max_batch_size": 1,
    "max_queue_delay_ms": 0.0,
}
# Requests/s as a product of one factor per dimension: its optimum is known, and away from the start in
# four of the five dimensions.
FACTORS = {
    "precision": {"fp32": 1.0, "fp16": 0.85, "int8": 1.6},
    "max_concurrent_batches": {1: 0.6, 2: 1.15, 3: 1.0, 4: 0.9},
    "intra_op_threads": {1: 1.0, 2: 0.8},
    "max_batch_size": {1: 1.0, 2: 1.1, 4: 1.25, 8: 0.95},
    "max_queue_delay_ms": {0.0: 1.0, 1.0: 1.05, 2.0: 1.15, 5.0: 0.9},
}
OPTIMUM = {
    "precision": "int8",
    "max_concurrent_batches": 2,
    "intra_op_threads": 1,
    "max_batch_size": 4,
    "max_queue_delay_ms": 2.0,
}


def true_rate(config) -> float:
    rate = 100.0
    for name, factors in FACTORS.items():
        if name == "max_queue_delay_ms" and config["max_batch_size"] == 1:
            continue
        rate *= factors[config[name]]
    return rate


def p99_ms(config) -> float:
    """Latency grows with the batch and its window."""
    return 10.0 + 5.0 * config["max_batch_size"] + 3.0 * config["max_queue_delay_ms"]


class Synthetic:
    """A noisy measurement (3% multiplicative, seeded) of the functions above; counts its calls."""

    def __init__(self, p99_bound: float | None = None, noise: float = 0.03, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.noise, self.p99_bound = noise, p99_bound
        self.calls: list[tuple[dict, str]] = []

    def __call__(self, config, phase) -> Sample:
        self.calls.append((dict(config), phase))
        config = {**START, **config}  # a smaller space: the rest at the start
        score = true_rate(config) * (1 + self.rng.gauss(0, self.noise))
        over = 0.0 if self.p99_bound is None else max(0.0, p99_ms(config) - self.p99_bound)
        return Sample(score, over, cost=1.0 if phase == "search" else 3.0)


def test_the_search_finds_the_known_optimum_within_its_budget():
    measure = Synthetic()
    found = search(SPACE, START, measure, budget=120, repeats=3, finalists=2, confirm_rounds=3)
    assert found.best.config == OPTIMUM
    assert found.start.config == START and found.start in found.finalists
    # Within the budget, and far fewer measurements than there are points.
    assert found.spent <= 120
    assert len({tuple(c.items()) for c, phase in measure.calls if phase == "search"}) < 312 / 6
    # The confirmation: every finalist measured in each of the three rounds, interleaved.
    confirm_calls = [c for c, phase in measure.calls if phase == "confirm"]
    assert len(confirm_calls) == 3 * len(found.finalists)
    assert (
        confirm_calls[: len(found.finalists)]
        == confirm_calls[len(found.finalists) : 2 * len(found.finalists)]
    )
    assert all(len(point.confirmed) == 3 for point in found.finalists)
    # The margin is the confirmed medians' ratio: the true one (1.6 x 1.15 x 1.25 x 1.15) within the noise.
    assert found.margin == pytest.approx(true_rate(OPTIMUM) / true_rate(START), rel=0.1)
    low, median, high = found.best.spread(True)
    assert low <= median <= high and high > low  # repeats, and their spread


def test_a_p99_bound_steers_the_search_to_the_best_feasible_point():
    measure = Synthetic(p99_bound=25.0)  # batch 4 (30 ms) and batch 2 with a 2 ms window (26 ms) are out
    found = search(SPACE, START, measure, budget=120)
    assert found.best.config == {**OPTIMUM, "max_batch_size": 2, "max_queue_delay_ms": 1.0}
    assert found.best.key(True)[0] == 0.0  # feasible
    assert p99_ms(found.best.config) <= 25.0


def test_infeasible_points_rank_by_how_far_outside_they_are():
    space = [Dimension("max_batch_size", (8, 4, 2, 1))]
    measure = Synthetic(p99_bound=5.0, noise=0.0)  # nothing is feasible: the closest (batch 1) wins
    found = search(space, {"max_batch_size": 8}, measure, budget=40)
    assert found.best.config == {"max_batch_size": 1}
    assert found.best.key(True)[0] < 0  # and it says it is not feasible


def test_a_delay_without_batching_is_one_point_and_never_measured_twice_over():
    measure = Synthetic(noise=0.0)
    search(SPACE, START, measure, budget=200)
    seen = {}
    for config, phase in measure.calls:
        if phase == "search":
            key = tuple(config.items())
            seen[key] = seen.get(key, 0) + 1
            if config["max_batch_size"] == 1:
                assert config["max_queue_delay_ms"] == 0.0
    assert max(seen.values()) <= 3  # the repeats, never more


def test_a_tiny_budget_stops_the_search_and_still_confirms_the_defaults():
    measure = Synthetic()
    found = search(SPACE, START, measure, budget=8, repeats=3)
    assert found.stopped_by_budget
    assert found.start in found.finalists and all(point.confirmed for point in found.finalists)
    # One sample past the budget at most: the first confirmation round always runs.
    assert found.spent <= 8 + 3 * len(found.finalists)


def test_a_start_outside_the_space_is_refused():
    with pytest.raises(ValueError, match="max_batch_size=3"):
        search(SPACE, {**START, "max_batch_size": 3}, Synthetic(), budget=10)


def test_the_cpu_space_starts_at_the_servers_defaults():
    space, start = tune.space_for("onnxruntime-cpu", ["fp32", "int8"], cores=2)
    assert start == {
        "precision": "fp32",
        "max_concurrent_batches": 3,
        "intra_op_threads": 1,
        "max_batch_size": 1,
        "max_queue_delay_ms": 0.0,
    }
    assert {d.name: d.values[0] for d in space} == start  # each dimension's first value is the default
    assert dict((d.name, d.values) for d in space)["max_concurrent_batches"] == (3, 1, 2, 4)
    gpu, gpu_start = tune.space_for("onnxruntime-cuda", ["fp32", "fp16"], cores=2)
    assert gpu_start["max_batch_size"] == 16 and "intra_op_threads" not in gpu_start
    assert {d.name: d.values[0] for d in gpu} == gpu_start


def test_a_short_real_tune_writes_a_file_the_server_starts_with(built_repository, tmp_path):
    out = tmp_path / "tune"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.tune",
            "--repository",
            str(built_repository),
            "--models",
            "shufflenet_v2",
            "--budget-s",
            "20",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config_path = out / "model_config.toml"
    assert f"MODEL_CONFIG={config_path}" in result.stdout
    sections = read_model_config(config_path)
    assert list(sections) == ["shufflenet_v2"]
    chosen = sections["shufflenet_v2"].given()
    assert set(chosen) == {
        "precision",
        "max_concurrent_batches",
        "intra_op_threads",
        "max_batch_size",
        "max_queue_delay_ms",
    }
    results = json.loads((out / "results.json").read_text())
    found = results["models"]["shufflenet_v2"]
    assert found["chosen"] == chosen and found["backend"] == "onnxruntime-cpu"
    # The defaults were measured in the same confirmation as the chosen configuration.
    default = next(point for point in found["points"] if point["config"] == found["default"])
    assert default["confirm"] and all(s["levels"][0]["ok"] > 0 for s in default["confirm"])
    assert [row["concurrency"] for row in default["confirm"][0]["levels"]] == [1, 16]
    report = (out / "report.md").read_text()
    assert "Finalists" in report and "Every configuration tried" in report and "**chosen**" in report
    assert (out / "tune.png").read_bytes().startswith(b"\x89PNG")

    with ready_service(
        built_repository, tmp_path / "server.log", MODELS="shufflenet_v2", MODEL_CONFIG=str(config_path)
    ) as server:
        entry = httpx.get(f"{server.url}/models/shufflenet_v2", timeout=10).json()
    settings = entry["settings"]
    assert settings["model_config_file"] == str(config_path)
    assert {key: settings[key] for key in chosen} == chosen
    assert all(settings["sources"][key] == "file" for key in chosen)
    assert entry["batching"]["max_batch_size"] == chosen["max_batch_size"]


def test_a_configuration_the_server_cannot_load_is_a_failed_trial_not_a_stall(built_repository, tmp_path):
    # No int8 build in this repository: the model fails to load, and the trial says so at once.
    trials = tune.Trials(built_repository, "shufflenet_v2", tmp_path, tune.Plan(), tune.Target(), images=[])
    _, start = tune.space_for("onnxruntime-cpu", ["fp32", "int8"], cores=2)
    sample = trials({**start, "precision": "int8"}, "search")
    assert sample.score == 0.0 and sample.penalty == float("inf")
    assert "shufflenet_v2 is failed" in sample.details["error"]
    assert sample.cost < 60  # not the 300 s the server is given to become ready
    assert (tmp_path / "trials" / "shufflenet_v2-001-search.toml").is_file()
