"""Settings: read from the environment once, typed, and loud about the variable that is wrong."""

from __future__ import annotations

import pytest

from service.config import ConfigError, Settings, load_settings


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
    assert settings.decode_workers >= 1 and settings.batches_in_flight >= 1


def test_an_empty_models_variable_means_discover(monkeypatch):
    monkeypatch.setenv("MODELS", " ")
    assert load_settings().models is None


@pytest.mark.parametrize(
    ("variable", "value"),
    [("MAX_BATCH_SIZE", "0"), ("MAX_BATCH_SIZE", "lots"), ("BACKEND", "cuda"), ("EXECUTION_MODE", "fast")],
)
def test_a_bad_value_names_its_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        load_settings()


def test_overrides_beat_the_environment(monkeypatch):
    monkeypatch.setenv("PORT", "9000")
    assert load_settings(port=8123).port == 8123
    assert Settings(port=1).port == 1
