"""Service configuration: one typed settings object, read from the environment once at startup.

Nothing else in the service reads ``os.environ``: ``python -m service`` calls :func:`load_settings`
and passes the result down (``create_app(settings)``); tests build ``Settings(...)`` directly.
Every variable is documented in the README with its default.
"""

from __future__ import annotations

import re
import tempfile
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import Field, GetCoreSchemaHandler, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import core_schema
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from contract.gpu import GPU_OPT_BATCH
from service.core.cpus import cpu_count
from service.core.runtimes.base import DEFAULT_ENGINE_CACHE_NAME

Backend = Literal["auto", "tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "onnxruntime-cpu"]
BACKENDS: tuple[str, ...] = typing.get_args(Backend)

GPU_BACKENDS = frozenset({"tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda"})


@dataclass(frozen=True)
class BatchingPolicy:
    """How one model's batcher forms and runs batches."""

    max_batch_size: int
    max_queue_delay_ms: float
    max_concurrent_batches: int


# Defaults per backend, used for whatever MAX_BATCH_SIZE / MAX_QUEUE_DELAY_MS / MAX_CONCURRENT_BATCHES
# leave unset. On CPU each request runs alone, one thread per core plus one: batching bought nothing per
# image and only added latency, and the extra thread keeps the cores busy while another waits for the
# GIL (measurements: docs/serving-defaults.md). A GPU gains from large batches: batch 16, a 2 ms window,
# two batches in flight (one copying while the other computes) is a starting point to measure from.
# max_concurrent_batches 0: one per core, plus one.
CPU_BATCHING = BatchingPolicy(max_batch_size=1, max_queue_delay_ms=0.0, max_concurrent_batches=0)
GPU_BATCHING = BatchingPolicy(max_batch_size=GPU_OPT_BATCH, max_queue_delay_ms=2.0, max_concurrent_batches=2)


class ConfigError(ValueError):
    """A configuration variable has a bad value; the message names the variable."""


class BackendChoice(str):
    """BACKEND, normalised to ``default[,model=backend...]``, with its parts parsed once, when the
    settings are validated: ``default`` and ``overrides`` (model -> backend). A ``str``, so the settings
    log and compare it as the variable's value."""

    default: str
    overrides: Mapping[str, str]

    def __new__(cls, value: str) -> BackendChoice:
        default, overrides = parse_backend(value)
        normalised = ",".join([default, *(f"{name}={backend}" for name, backend in overrides.items())])
        choice = super().__new__(cls, normalised)
        choice.default = default
        choice.overrides = MappingProxyType(overrides)
        return choice

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        # A bad entry's ValueError becomes a validation error of BACKEND, which names it.
        return core_schema.no_info_after_validator_function(
            cls, core_schema.str_schema(), serialization=core_schema.to_string_ser_schema()
        )


def parse_backend(value: str) -> tuple[str, dict[str, str]]:
    """``"auto,mobilenet_v2=tensorrt"`` -> ``("auto", {"mobilenet_v2": "tensorrt"})``.

    Entries are comma-separated: at most one bare backend (the default for every model not named;
    ``auto`` if there is none) and any number of ``model=backend`` overrides, each model at most once.
    A bad entry raises ValueError naming it.
    """
    default: str | None = None
    overrides: dict[str, str] = {}
    choices = ", ".join(BACKENDS)
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        name, sep, backend = (part.strip() for part in entry.partition("="))
        if not sep:
            name, backend = "", name
        if backend not in BACKENDS:
            raise ValueError(f"bad entry {entry!r}: {backend!r} is not one of {choices}")
        if not sep:
            if default is not None:
                raise ValueError(f"bad entry {entry!r}: a second default backend (the first was {default!r})")
            default = backend
        elif not name:
            raise ValueError(f"bad entry {entry!r}: no model name before '='")
        elif name in overrides:
            raise ValueError(f"bad entry {entry!r}: {name} is given a backend twice")
        else:
            overrides[name] = backend
    return default or "auto", overrides


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
    # One backend for every model (``auto``), or a default plus per-model overrides:
    # ``auto,mobilenet_v2=tensorrt``. Normalised to ``default[,name=backend...]``; see backend_for().
    backend: BackendChoice = BackendChoice("auto")
    # The version a model serves when a request names none: ``mobilenet_v2=2,shufflenet_v2=1``. A pinned
    # model loads only that version; the others load every version their directory holds and serve
    # the highest one that is ready.
    model_versions: Annotated[dict[str, int], NoDecode] = Field(default_factory=dict)
    # POST /v2/repository/index, .../models/{m}/load and .../unload (behind the bearer token when one
    # is set). SIGHUP rescans the repository whether or not this is on.
    repository_api: bool = False

    # --- dynamic batching and admission ----------------------------------------------------
    # Unset: the backend's default (CPU_BATCHING / GPU_BATCHING above).
    max_batch_size: int | None = Field(None, ge=1, le=256)
    max_queue_delay_ms: float | None = Field(None, ge=0, le=10_000)
    # Batches of one model that may run at the same time; 0 means one per CPU core, plus one.
    max_concurrent_batches: int | None = Field(None, ge=0)
    max_queue_size: int = Field(64, ge=1)
    request_timeout_s: float = Field(10.0, gt=0)

    # --- input limits --------------------------------------------------------------------------
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1)
    # The whole body must arrive within this many seconds of the request's headers (slow clients and
    # slow-loris trickles get 408 and the connection closed); 20 MiB in 60 s is ~2.8 Mbit/s.
    body_read_timeout_s: float = Field(60.0, gt=0)
    # A request's headers must arrive within this many seconds of the connection opening (or of the
    # request's first byte on a kept-alive connection): idle and slow-loris connections get 408.
    header_timeout_s: float = Field(10.0, gt=0)
    # The most bytes a request's line and headers may take together (431 and the connection closed
    # past it), as common proxies bound them; the body has its own cap (max_body_bytes).
    max_header_bytes: int = Field(16 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1)

    # --- ONNX Runtime and thread pools ---------------------------------------------------------
    intra_op_threads: int = Field(1, ge=0, description="0: ONNX Runtime's default (one per core)")
    inter_op_threads: int = Field(1, ge=0)
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    decode_threads: int = Field(0, ge=0, description="0: one per CPU core")
    warmup: bool = True

    # --- GPU backends ----------------------------------------------------------------------------
    # Where GPU backends write their caches (ONNX Runtime's TensorRT engines and timing cache); None:
    # ``engine-cache`` under the scratch directory (see engine_cache_path).
    engine_cache_dir: Path | None = None
    # fp32 work on a GPU may use TF32 (faster, logits ~1e-3 off the CPU's); False keeps fp32 in fp32.
    allow_tf32: bool = False

    # --- process -------------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    shutdown_grace_s: float = Field(20.0, gt=0)
    # False: once the models are loaded, the event loop thread waits for a free core rather than
    # preempting an inference thread whenever it wakes (SCHED_BATCH on Linux; service/process.py).
    event_loop_preempts: bool = False

    # --- security ------------------------------------------------------------------------------
    # The one directory the server may write to (temporary files of the service and its libraries,
    # via TMPDIR); None: the system's (TMPDIR, else /tmp). The rest of the filesystem may be read-only.
    scratch_dir: Path | None = None
    # /docs and /redoc (Swagger UI and ReDoc, which load their scripts from a CDN); /openapi.json is
    # always served.
    docs_enabled: bool = False
    # Bearer token for every route but /, /healthz and /readyz; at most one of the two may be set.
    auth_token: SecretStr | None = None
    auth_token_file: Path | None = None
    # Serve /metrics on this port only (on HOST), not on PORT; None: on PORT, like every other route.
    metrics_port: int | None = Field(None, ge=1, le=65535)
    # The Open Inference Protocol over gRPC, served beside HTTP by ``python -m service`` (on HOST);
    # 0: a free port chosen by the system (logged).
    grpc_port: int = Field(8001, ge=0, le=65535)

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            names = tuple(name.strip() for name in value.split(",") if name.strip())
            return names or None
        return value

    @field_validator("model_versions", mode="before")
    @classmethod
    def _parse_versions(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        pins: dict[str, int] = {}
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue
            name, equals, version = item.partition("=")
            if not equals or not name.strip() or not version.strip().isdigit() or int(version) < 1:
                raise ValueError(f"MODEL_VERSIONS: {item!r} is not NAME=VERSION with VERSION an integer >= 1")
            pins[name.strip()] = int(version)
        return pins

    @field_validator("auth_token")
    @classmethod
    def _check_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_token(value.get_secret_value())
        return value

    @field_validator("auth_token_file")
    @classmethod
    def _check_token_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                text = value.read_text(encoding="ascii")
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read the token from {value}: {exc}") from None
            check_token(text.strip())
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ValueError("AUTH_TOKEN and AUTH_TOKEN_FILE are both set: set one")
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError(f"METRICS_PORT is PORT ({self.port}): unset it, or pick another port")
        if self.grpc_port != 0 and self.grpc_port in (self.port, self.metrics_port):
            raise ValueError(f"GRPC_PORT is PORT or METRICS_PORT ({self.grpc_port}): pick another port")
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def default_backend(self) -> str:
        return self.backend.default

    @property
    def backend_overrides(self) -> Mapping[str, str]:
        return self.backend.overrides

    def backend_for(self, model: str) -> str:
        """The backend asked for ``model`` (as clients spell it, e.g. ``mobilenet_v2:int8``)."""
        return self.backend.overrides.get(model, self.backend.default)

    def expected_token(self) -> bytes | None:
        """The bearer token clients must send (AUTH_TOKEN, or AUTH_TOKEN_FILE's content), or None."""
        if self.auth_token is not None:
            return self.auth_token.get_secret_value().encode("ascii")
        if self.auth_token_file is not None:
            token = self.auth_token_file.read_text(encoding="ascii").strip()
            check_token(token)
            return token.encode("ascii")
        return None

    @property
    def scratch_path(self) -> Path:
        return self.scratch_dir if self.scratch_dir is not None else Path(tempfile.gettempdir())

    @property
    def engine_cache_path(self) -> Path:
        if self.engine_cache_dir is not None:
            return self.engine_cache_dir
        return self.scratch_path / DEFAULT_ENGINE_CACHE_NAME

    @property
    def decode_workers(self) -> int:
        return self.decode_threads or cpu_count()

    def batching_for(self, backend: str) -> BatchingPolicy:
        """The batching policy for a model running on ``backend``: the settings over its defaults."""
        default = GPU_BATCHING if backend in GPU_BACKENDS else CPU_BATCHING

        def pick(value: float | None, fallback: float) -> float:
            return fallback if value is None else value

        return BatchingPolicy(
            max_batch_size=int(pick(self.max_batch_size, default.max_batch_size)),
            max_queue_delay_ms=float(pick(self.max_queue_delay_ms, default.max_queue_delay_ms)),
            max_concurrent_batches=int(pick(self.max_concurrent_batches, default.max_concurrent_batches))
            or cpu_count() + 1,
        )


# RFC 6750's b64token: what a client can send after "Bearer " without quoting.
_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
MIN_TOKEN_CHARS = 16


def check_token(token: str) -> None:
    """A bearer token must be sendable as is and not trivially guessable; the message never shows it."""
    if not _TOKEN.fullmatch(token):
        raise ValueError("the token may hold only letters, digits and -._~+/ (then = padding), no spaces")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the token is {len(token)} characters; use at least {MIN_TOKEN_CHARS}")


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment; a bad value raises :class:`ConfigError` naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            variable = "_".join(str(part) for part in error["loc"][:1]).upper()
            if not variable:  # a check across variables: its message names them
                problems.append(error["msg"].removeprefix("Value error, "))
                continue
            given = "a secret" if variable == "AUTH_TOKEN" else repr(error.get("input"))
            problems.append(f"{variable}: {error['msg']} (got {given})")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
