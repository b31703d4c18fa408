"""The layout's rules: which package may import which, and the model-family table as the one source.

contract/ is what the build and the server share, so it depends on neither; the server never loads
PyTorch or the build; the networks know nothing of how they are built or served; and nothing shipped
depends on the benchmarks. Imports are read from the source (``ast``), lazy ones inside functions too.
"""

from __future__ import annotations

import ast
import itertools
import math
from pathlib import Path

import pytest
from torch import nn

import models
from contract import manifest, zoo

REPO = Path(__file__).resolve().parents[1]

# package (or top-level module) -> top-level names it must never import
FORBIDDEN: dict[str, set[str]] = {
    "contract": {"models", "builder", "service", "benchmarks"},
    "service": {"models", "builder", "benchmarks", "torch"},
    "builder": {"benchmarks"},
    "build_engines.py": {"benchmarks"},
    "models": {"builder", "service", "benchmarks"},
}


def _sources(where: str) -> list[Path]:
    path = REPO / where
    return [path] if path.is_file() else sorted(path.rglob("*.py"))


def _imported_modules(path: Path, root: Path = REPO) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, with relative imports made absolute."""
    package = path.relative_to(root).with_suffix("").parts[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
    return found


@pytest.mark.parametrize("where", sorted(FORBIDDEN))
def test_import_direction(where):
    sources = _sources(where)
    assert sources, f"{where} has no Python files"
    offenders = [
        f"{path.relative_to(REPO)} imports {module}"
        for path in sources
        for module in sorted(_imported_modules(path))
        if module.split(".")[0] in FORBIDDEN[where]
    ]
    assert not offenders, "\n".join(offenders)


# Inside the server: the shared core knows no front door, and the batcher no HTTP and no images.
CORE_FORBIDDEN: dict[str, set[str]] = {
    "service/core": {"service.http", "service.oip", "fastapi", "starlette", "uvicorn", "grpc"},
    "service/core/batcher.py": {"service.http", "service.core.imaging", "service.core.pipeline", "PIL"},
}


@pytest.mark.parametrize("where", sorted(CORE_FORBIDDEN))
def test_the_core_knows_no_front_door(where):
    offenders = [
        f"{path.relative_to(REPO)} imports {module}"
        for path in _sources(where)
        for module in sorted(_imported_modules(path))
        if any(module == banned or module.startswith(banned + ".") for banned in CORE_FORBIDDEN[where])
    ]
    assert not offenders, "\n".join(offenders)


def test_the_import_reader_sees_lazy_and_relative_imports(tmp_path):
    package = tmp_path / "service" / "core"
    package.mkdir(parents=True)
    source = package / "x.py"
    source.write_text("def f():\n    import torch\n    from ..http import routes\n    from . import y\n")
    assert _imported_modules(source, tmp_path) == {"torch", "service.http", "service.core"}


# --- the family table is the one source ----------------------------------------------------------------
def test_every_family_has_a_constructor_that_models_create_resolves():
    for family in zoo.FAMILIES.values():
        cls = models.constructor(family.name)
        assert issubclass(cls, nn.Module), family.constructor
        assert f"{cls.__module__}:{cls.__qualname__}" == family.constructor
        spec = zoo.parse(family.name)
        assert isinstance(models.create(family.name), cls)
        assert (spec.variant, spec.family) == (family.default, family.name)


def test_all_variants_cover_exactly_the_table():
    variants = zoo.all_variants()
    assert len(variants) == len(set(variants))
    expected = sum(math.prod(len(knob.values) for knob in family.knobs) for family in zoo.FAMILIES.values())
    assert len(variants) == expected
    for family in zoo.FAMILIES.values():
        mine = [v for v in variants if zoo.parse(v).family == family.name]
        assert mine == family.variants()
        for variant, values in zip(mine, itertools.product(*(k.values for k in family.knobs)), strict=True):
            spec = zoo.parse(variant)
            assert spec.variant == variant
            knobs = {k.key: value for k, value in zip(family.knobs, values, strict=True)}
            assert spec.resolution == knobs.pop(zoo.RESOLUTION, family.resolution)
            assert spec.knobs == knobs
            assert spec.preprocessing == family.preprocessing.for_resolution(spec.resolution)
            assert spec.weights is family.weights.get(variant)
        assert set(family.weights) <= set(mine), "published weights only for variants the grammar admits"
        assert zoo.parse(family.example).family == family.name


def test_names_aliases_and_the_manifest_follow_the_table():
    assert tuple(zoo.FAMILIES) == zoo.DEFAULT_MODELS
    assert {name: family.default for name, family in zoo.FAMILIES.items()} == zoo.ALIASES
    assert {v: w for family in zoo.FAMILIES.values() for v, w in family.weights.items()} == zoo.PUBLISHED
    family_schema = manifest.Manifest.model_json_schema()["properties"]["family"]
    assert family_schema["enum"] == list(zoo.FAMILIES)
