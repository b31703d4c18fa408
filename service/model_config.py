"""``MODEL_CONFIG``: serving settings per model, from a TOML file with one table per model.

    # written by `make tune`, or by hand
    [mobilenet_v2]
    precision = "int8"          # serve the int8 build under the plain name
    max_batch_size = 1
    max_queue_delay_ms = 0
    max_concurrent_batches = 3
    intra_op_threads = 1

    ["shufflenet_v2:fp16"]      # a served name with its precision suffix is a table of its own
    max_concurrent_batches = 2

A table applies to the served name it spells, exactly (``mobilenet_v2`` does not cover
``mobilenet_v2:int8``), as ``BACKEND``'s overrides do. Every key is optional; what a table leaves out
comes from the environment or the backend's default, and a variable that is set in the environment
wins over the file (``Settings.for_model`` in ``service/config.py`` puts the three together).

This module owns the file's format: its keys and their bounds (which the environment variables of the
same names share), reading it with errors that name the file, the table and the key, and writing it
(``render_model_config``, which ``benchmarks/tune.py`` uses). It knows nothing of ``Settings``.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, ValidationError
from pydantic_core import core_schema

from contract.zoo import PRECISIONS, UnknownModelError, parse, split_precision

# The bounds of each setting, shared by the environment variables of the same names (service/config.py).
MaxBatchSize = Annotated[int, Field(ge=1, le=256)]
MaxQueueDelayMs = Annotated[float, Field(ge=0, le=10_000)]
# 0: one per CPU core, plus one.
MaxConcurrentBatches = Annotated[int, Field(ge=0)]
# 0: ONNX Runtime's default (one per core).
OpThreads = Annotated[int, Field(ge=0)]
ExecutionMode = Literal["sequential", "parallel"]
Precision = Literal[PRECISIONS]  # fp32, fp16, int8: the builds build_engines.py writes


class ModelSection(BaseModel):
    """One model's table: the settings it fixes (None: not given here)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    max_batch_size: MaxBatchSize | None = None
    max_queue_delay_ms: MaxQueueDelayMs | None = None
    max_concurrent_batches: MaxConcurrentBatches | None = None
    intra_op_threads: OpThreads | None = None
    inter_op_threads: OpThreads | None = None
    execution_mode: ExecutionMode | None = None
    precision: Precision | None = None

    def given(self) -> dict[str, Any]:
        """The keys this table sets, with their values."""
        return self.model_dump(exclude_none=True)


KEYS: tuple[str, ...] = tuple(ModelSection.model_fields)


def read_model_config(path: Path) -> dict[str, ModelSection]:
    """The tables of ``path`` by served model name. A problem raises ValueError naming the file, and the
    table and the key where there is one."""
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    sections: dict[str, ModelSection] = {}
    for name, table in document.items():
        if not isinstance(table, dict):
            raise ValueError(
                f"{path}: top-level key {name!r}: every setting belongs in a model's table, e.g. "
                f"[mobilenet_v2] then {name} = {table!r}"
            )
        sections[name] = _section(path, name, table)
    return sections


def _section(path: Path, name: str, table: dict[str, Any]) -> ModelSection:
    where = f"{path}: [{name}]"
    try:
        parse(name)
        _, suffix = split_precision(name)
    except UnknownModelError as exc:
        raise ValueError(f"{where}: not a model name: {exc}") from None
    try:
        section = ModelSection.model_validate(table)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"]) or "?"
            if error["type"] == "extra_forbidden":
                problems.append(f"{key}: unknown key; the keys are {', '.join(KEYS)}")
            else:
                problems.append(f"{key}: {error['msg']} (got {error['input']!r})")
        raise ValueError(f"{where} " + "; ".join(problems)) from None
    if ":" in name and section.precision not in (None, suffix):
        raise ValueError(
            f"{where} precision: {section.precision!r} contradicts the table's name, which serves {suffix}; "
            f"name the table [{name.partition(':')[0]}] to serve the {section.precision} build under the "
            "plain name"
        )
    return section


class ModelConfigFile(str):
    """MODEL_CONFIG: the path as given (a ``str``, so the settings log and compare it as the variable's
    value), with its tables read and checked once, when the settings are validated."""

    sections: Mapping[str, ModelSection]

    def __new__(cls, value: str | Path) -> ModelConfigFile:
        config = super().__new__(cls, str(value))
        config.sections = MappingProxyType(read_model_config(Path(value)))
        return config

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        # The reader's ValueError becomes a validation error of MODEL_CONFIG, with its message.
        return core_schema.no_info_after_validator_function(
            cls,
            core_schema.union_schema([core_schema.str_schema(), core_schema.is_instance_schema(Path)]),
            serialization=core_schema.to_string_ser_schema(),
        )


def render_model_config(sections: Mapping[str, Mapping[str, Any]], comments: tuple[str, ...] = ()) -> str:
    """A MODEL_CONFIG file of ``sections`` (model name -> key -> value), the ``comments`` on top. Every
    table is checked as the reader checks it, so what this writes, the server reads."""
    lines = [f"# {line}".rstrip() for comment in comments for line in comment.splitlines()]
    for name, values in sections.items():
        _section(Path("<rendered>"), name, dict(values))
        if lines:
            lines.append("")
        lines.append(f"[{_key(name)}]")
        lines.extend(f"{key} = {_value(value)}" for key, value in values.items() if value is not None)
    return "\n".join(lines) + "\n"


def _key(name: str) -> str:
    bare = name.replace("_", "").replace("-", "").isalnum() and name.isascii()
    return name if bare else _value(name)


def _value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TypeError(f"cannot write {value!r} to a model config")
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"cannot write {value!r} to a model config")
    return repr(value)
