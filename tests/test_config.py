"""Settings: read from the environment once, typed, and loud about the variable that is wrong."""

from __future__ import annotations

import pytest

from service import config
from service.config import (
    CPU_BATCHING,
    GPU_BATCHING,
    BatchingPolicy,
    ConfigError,
    Settings,
    load_settings,
)
from service.core.cpus import cpu_count


def test_defaults_and_environment(monkeypatch):
    monkeypatch.setenv("MODELS", "mobilenet_v2, shufflenet_v2:int8,")
    monkeypatch.setenv("MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("WARMUP", "false")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    settings = load_settings()
    assert settings.models == ("mobilenet_v2", "shufflenet_v2:int8")
    assert settings.max_batch_size == 8
    assert settings.warmup is False
    assert settings.log_level == "DEBUG"
    assert settings.backend == "auto"
    assert settings.decode_workers >= 1


def test_batching_defaults_depend_on_the_backend_and_settings_win(monkeypatch):
    for variable in ("MAX_BATCH_SIZE", "MAX_QUEUE_DELAY_MS", "MAX_CONCURRENT_BATCHES"):
        monkeypatch.delenv(variable, raising=False)
    defaults = load_settings()
    cpu = defaults.batching_for("onnxruntime-cpu")
    assert (cpu.max_batch_size, cpu.max_queue_delay_ms) == (CPU_BATCHING.max_batch_size, 0.0)
    assert cpu.max_concurrent_batches == cpu_count() + 1  # 0 in the table: one per core, plus one
    assert defaults.batching_for("onnxruntime-cuda") == GPU_BATCHING
    explicit = load_settings(max_batch_size=8, max_queue_delay_ms=0, max_concurrent_batches=1)
    assert explicit.batching_for("onnxruntime-cuda") == BatchingPolicy(8, 0.0, 1)


def test_an_empty_models_variable_means_discover(monkeypatch):
    monkeypatch.setenv("MODELS", " ")
    assert load_settings().models is None


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MAX_BATCH_SIZE", "0"),
        ("MAX_BATCH_SIZE", "lots"),
        ("BACKEND", "cuda"),
        ("EXECUTION_MODE", "fast"),
    ],
)
def test_a_bad_value_names_its_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        load_settings()


def test_overrides_beat_the_environment(monkeypatch):
    monkeypatch.setenv("PORT", "9000")
    assert load_settings(port=8123).port == 8123
    assert Settings(port=1).port == 1


def test_backend_is_one_value_or_a_default_with_per_model_overrides(monkeypatch):
    monkeypatch.setenv("BACKEND", " onnxruntime-cpu , mobilenet_v2=tensorrt,shufflenet_v2:int8 = auto ")
    settings = load_settings()
    assert settings.backend == "onnxruntime-cpu,mobilenet_v2=tensorrt,shufflenet_v2:int8=auto"
    assert settings.default_backend == "onnxruntime-cpu"
    assert settings.backend_overrides == {"mobilenet_v2": "tensorrt", "shufflenet_v2:int8": "auto"}
    assert settings.backend_for("mobilenet_v2") == "tensorrt"
    assert settings.backend_for("shufflenet_v2:int8") == "auto"
    assert settings.backend_for("shufflenet_v2") == "onnxruntime-cpu"
    # Overrides alone: the rest take auto.
    only = load_settings(backend="mobilenet_v2=onnxruntime-cuda")
    assert only.backend_for("mobilenet_v1") == "auto"
    assert only.backend_for("mobilenet_v2") == "onnxruntime-cuda"
    assert load_settings(backend="tensorrt").backend_for("anything") == "tensorrt"


def test_backend_is_parsed_once_when_the_settings_are_validated(monkeypatch):
    settings = load_settings(backend="onnxruntime-cpu,mobilenet_v2=tensorrt")
    assert (settings.backend.default, dict(settings.backend.overrides)) == (
        "onnxruntime-cpu",
        {"mobilenet_v2": "tensorrt"},
    )

    def parse_again(value: str) -> tuple[str, dict[str, str]]:
        raise AssertionError(f"BACKEND parsed again: {value!r}")

    monkeypatch.setattr(config, "parse_backend", parse_again)
    assert settings.backend_for("mobilenet_v2") == "tensorrt"
    assert settings.backend_for("shufflenet_v2") == "onnxruntime-cpu"
    assert (settings.default_backend, dict(settings.backend_overrides)) == (
        "onnxruntime-cpu",
        {"mobilenet_v2": "tensorrt"},
    )
    assert settings.model_dump(mode="json")["backend"] == "onnxruntime-cpu,mobilenet_v2=tensorrt"


@pytest.mark.parametrize(
    ("value", "entry"),
    [
        ("auto,mobilenet_v2=cuda", "mobilenet_v2=cuda"),
        ("auto,tensorrt", "tensorrt"),
        ("=tensorrt", "=tensorrt"),
        ("auto,mobilenet_v2=tensorrt,mobilenet_v2=auto", "mobilenet_v2=auto"),
    ],
)
def test_a_bad_backend_entry_is_named(monkeypatch, value, entry):
    monkeypatch.setenv("BACKEND", value)
    with pytest.raises(ConfigError, match="BACKEND") as caught:
        load_settings()
    assert f"bad entry {entry!r}" in str(caught.value)
