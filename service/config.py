"""Service configuration: one typed settings object, read from the environment once at startup.

Nothing else in the service reads ``os.environ``: ``python -m service`` calls :func:`load_settings`
and passes the result down (``create_app(settings)``); tests build ``Settings(...)`` directly.
Every variable is documented in the README with its default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Backend = Literal["auto", "tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "onnxruntime-cpu"]

# Batching defaults for ONNX Runtime on CPU, measured on a 2-vCPU box (MobileNet v2 / ShuffleNet v2,
# intra-op threads 1): per-image cost at batch 1/2/4/8 was 7.0/7.0/7.1/7.3 ms and 4.6/4.4/4.3/4.3 ms.
# A CPU gains next to nothing per image from a bigger batch, so waiting for one only adds latency:
# the batcher never waits (delay 0) and takes whatever is already queued, up to 4, when it frees up.
# That keeps the batch-1 latency at low load and still amortises the per-call overhead under load.
# A GPU backend wants the opposite (batch 8+ and a few ms of delay): set the variables there.
DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_MAX_QUEUE_DELAY_MS = 0.0


class ConfigError(ValueError):
    """A configuration variable has a bad value; the message names the variable."""


class Settings(BaseSettings):
    """Every knob of the service; field ``foo_bar`` is read from the variable ``FOO_BAR``."""

    model_config = SettingsConfigDict(
        case_sensitive=False,
        extra="ignore",
        frozen=True,
        protected_namespaces=(),
    )

    # --- what to serve ---------------------------------------------------------------------
    model_repository: Path = Path("model_repository")
    # Comma-separated; None means every model directory found in the repository.
    models: Annotated[tuple[str, ...] | None, NoDecode] = None
    backend: Backend = "auto"

    # --- dynamic batching and admission ----------------------------------------------------
    max_batch_size: int = Field(DEFAULT_MAX_BATCH_SIZE, ge=1, le=256)
    max_queue_delay_ms: float = Field(DEFAULT_MAX_QUEUE_DELAY_MS, ge=0, le=10_000)
    max_queue_size: int = Field(64, ge=1)
    # Batches of one model that may run at the same time: with intra-op threads 1 on CPU, one per
    # core keeps every core busy, where one batch at a time leaves the others to decoding only.
    max_concurrent_batches: int = Field(0, ge=0, description="0: one per CPU core")
    request_timeout_s: float = Field(10.0, gt=0)

    # --- input limits --------------------------------------------------------------------------
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)

    # --- ONNX Runtime and thread pools ---------------------------------------------------------
    intra_op_threads: int = Field(1, ge=0, description="0: ONNX Runtime's default (one per core)")
    inter_op_threads: int = Field(1, ge=0)
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    decode_threads: int = Field(0, ge=0, description="0: one per CPU core")
    warmup: bool = True

    # --- process -------------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    shutdown_grace_s: float = Field(20.0, gt=0)

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            names = tuple(name.strip() for name in value.split(",") if name.strip())
            return names or None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def decode_workers(self) -> int:
        return self.decode_threads or cpu_count()

    @property
    def batches_in_flight(self) -> int:
        return self.max_concurrent_batches or cpu_count()


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, which containers narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment; a bad value raises :class:`ConfigError` naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            variable = "_".join(str(part) for part in error["loc"][:1]).upper() or "?"
            problems.append(f"{variable}: {error['msg']} (got {error.get('input')!r})")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
