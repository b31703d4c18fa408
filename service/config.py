"""Service configuration: one typed settings object, read from the environment once at startup.

Nothing else in the service reads ``os.environ``: ``python -m service`` calls :func:`load_settings`
and passes the result down (``create_app(settings)``); tests build ``Settings(...)`` directly.
Every variable is documented in the README with its default.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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
# leave unset.
#
# CPU, measured on this 2-vCPU box (ONNX Runtime 1.32, the four default models, random weights):
# * Per image, batching buys nothing at intra-op threads 1: ms/image at batch 1/2/4/8 was
#   11.7/11.4/11.6/16.9 (MobileNet v1), 8.3/8.4/7.7/7.9 (v2), 4.4/4.8/4.2/4.5 (ShuffleNet v1),
#   5.8/6.1/7.5/5.1 (v2): within noise, and worse at 8 once the activations leave the cache.
# * Served at concurrency 16 (500x375 JPEGs, MobileNet v2, two rounds), batch 1 with two batches
#   in flight gave 101 and 97 req/s; batch 4 with two in flight 71 and 67; batch 4 one at a time 61
#   and 63; batch 1 one at a time 86 and 71. A wait for a fuller batch (8, 5 ms) only added latency:
#   ShuffleNet v2 p50 at concurrency 1 went from 9-13 ms to 15-19 ms.
# * Intra-op threads 2 was slower and erratic while the box was shared with other work (MobileNet v1
#   batch 1: 28.6 ms vs 11.7); on a quiet box it shortens a lone request's inference (MobileNet v2
#   served p50 at concurrency 1: 7.8-10.4 ms vs 11.2-11.7) but costs throughput once every core is
#   busy (130-137 vs 167-175 req/s at concurrency 16). The default serves throughput; the README
#   says how to trade.
# So on CPU each request runs alone (batch 1, no delay) on one thread: the parallelism comes from
# running requests side by side, not from stacking them.
# * Side by side, one inference thread more than there are cores: an inference thread waiting for
#   the GIL (held by the event loop, or by another thread's Python between native calls) then
#   leaves its core to a thread with native work to do. At concurrency 16 on 2 cores, with the event
#   loop not preempting (EVENT_LOOP_PREEMPTS, service/scheduling.py), 3 threads against 2 left the
#   machine idle 1-1.6% of the time instead of 2-3.4% and served 2-5% more (ShuffleNet v1/v2,
#   MobileNet v2, alternating rounds); with a preempting loop, a third thread gained nothing.
#
# GPU: not measurable here (no GPU on this box). A GPU does gain per image from large batches, so
# the starting point is batch 16 with a 2 ms window and two batches in flight (one copying while
# the other computes); measure on the target card and set the variables.
# max_concurrent_batches 0: one per core, plus one.
CPU_BATCHING = BatchingPolicy(max_batch_size=1, max_queue_delay_ms=0.0, max_concurrent_batches=0)
GPU_BATCHING = BatchingPolicy(max_batch_size=16, max_queue_delay_ms=2.0, max_concurrent_batches=2)


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
    # One backend for every model (``auto``), or a default plus per-model overrides:
    # ``auto,mobilenet_v2=tensorrt``. Normalised to ``default[,name=backend...]``; see backend_for().
    backend: str = "auto"

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
    # False: once the models are loaded, the event loop thread waits for a free core rather than
    # preempting an inference thread whenever it wakes (SCHED_BATCH on Linux; service/scheduling.py).
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

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            names = tuple(name.strip() for name in value.split(",") if name.strip())
            return names or None
        return value

    @field_validator("backend", mode="before")
    @classmethod
    def _parse_backend(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        default, overrides = parse_backend(value)
        return ",".join([default, *(f"{name}={backend}" for name, backend in overrides.items())])

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
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def default_backend(self) -> str:
        return parse_backend(self.backend)[0]

    @property
    def backend_overrides(self) -> dict[str, str]:
        return parse_backend(self.backend)[1]

    def backend_for(self, model: str) -> str:
        """The backend asked for ``model`` (as clients spell it, e.g. ``mobilenet_v2:int8``)."""
        default, overrides = parse_backend(self.backend)
        return overrides.get(model, default)

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


# RFC 6750's b64token: what a client can send after "Bearer " without quoting.
_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
MIN_TOKEN_CHARS = 16


def check_token(token: str) -> None:
    """A bearer token must be sendable as is and not trivially guessable; the message never shows it."""
    if not _TOKEN.fullmatch(token):
        raise ValueError("the token may hold only letters, digits and -._~+/ (then = padding), no spaces")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the token is {len(token)} characters; use at least {MIN_TOKEN_CHARS}")


def cpu_count() -> int:
    """CPUs this process may use, at least 1: the CPUs its affinity mask allows (a cpuset narrows
    it), and no more than its cgroup's CPU limit, rounded up. A Kubernetes or Docker CPU limit is a
    quota, not an affinity mask: without it, a pod limited to 2 CPUs on a 64-core node would start
    65 inference threads per model."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def cgroup_cpu_limit(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> float | None:
    """The CPU limit of this process's cgroup in CPUs (quota / period), the tightest one on the way
    from the hierarchy's top to its own group; None when there is none (or no cgroups to read).

    cgroup v2: ``cpu.max`` ("max 100000", or "200000 100000" for 2 CPUs). v1: ``cpu.cfs_quota_us``
    (-1: none) over ``cpu.cfs_period_us``, under the cpu controller's mount.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            mount = root
        elif "cpu" in controllers.split(","):
            mount = root / controllers
        else:
            continue
        # In a container the group's own path may not exist under the mount (it is the container's
        # root there): every directory that does exist along the path counts.
        parts = [part for part in path.split("/") if part]
        for depth in range(len(parts) + 1):
            limit = _cpu_quota(mount.joinpath(*parts[:depth]), v2=controllers == "")
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def _cpu_quota(group: Path, *, v2: bool) -> float | None:
    try:
        if v2:
            quota, period = (group / "cpu.max").read_text().split()
        else:
            quota = (group / "cpu.cfs_quota_us").read_text().strip()
            period = (group / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1"):
            return None
        return int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


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
