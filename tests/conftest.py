"""Shared fixtures: a repository of tiny ONNX classifiers, and the four default models built for real."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from contract.zoo import DEFAULT_MODELS
from tests.fake_repository import make_repository

REPO = Path(__file__).resolve().parents[1]
# Kept between runs (build_engines.py skips what is up to date), so only a fresh clone pays for it.
BUILT_REPOSITORY = REPO / ".cache" / "test-model-repository"


@pytest.fixture(scope="session")
def fake_repo(tmp_path_factory) -> Path:
    """``mobilenet_v2`` and ``shufflenet_v2`` as tiny 32x32 ONNX classifiers with valid manifests."""
    return make_repository(tmp_path_factory.mktemp("fake") / "model_repository")


@pytest.fixture(scope="session")
def built_repository() -> Path:
    """The four default models exported by build_engines.py with random weights. A failed build fails."""
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "build_engines.py"),
            "--models",
            *DEFAULT_MODELS,
            "--weights",
            "random",
            "--out",
            str(BUILT_REPOSITORY),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"build_engines.py failed:\n{result.stdout}\n{result.stderr}"
    return BUILT_REPOSITORY
