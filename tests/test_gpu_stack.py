"""The GPU stacks that pyproject's extras install: versions that load together.

deploy/gpu_stacks.toml records, per stack, the extra's requirements and what the pinned
onnxruntime-gpu wheel links (measured with readelf; the wheel is too big to fetch here). The first
tests check pyproject against that file and the pins against the measured facts, offline. The
resolver tests ask the package index what each extra installs (``pip install --dry-run``, nothing
installed) and check its answer against the pins and the facts; they skip, saying why, where the
index cannot be reached.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tomllib
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
STACKS_FILE = REPO / "deploy" / "gpu_stacks.toml"
FACTS = tomllib.loads(STACKS_FILE.read_text())
STACKS: dict[str, dict] = FACTS["stacks"]
# Stacks built around an onnxruntime-gpu wheel (x86-64); the Jetson one adds cuda-python only.
WHEEL_STACKS = [name for name, stack in STACKS.items() if "measured" in stack]
OPTIONAL = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
# What a GPU extra may carry besides its stack: tools for making the fp16/int8 variants.
TOOLS = {"onnx", "onnxconverter-common"}
PIP_TIMEOUT_S = 120


def _name(requirement: str) -> str:
    return canonicalize_name(Requirement(requirement).name)


def _pin(stack: dict, role: str) -> Requirement:
    """The stack's requirement for the package that plays ``role`` (``[stacks.X.packages]``)."""
    wanted = canonicalize_name(stack["packages"][role])
    (line,) = [line for line in stack["requirements"] if _name(line) == wanted]
    return Requirement(line)


def _bounds(specifier: SpecifierSet) -> tuple[Version, Version | None]:
    """(lowest allowed, first excluded) of a ``>=A,<B`` or ``==A`` specifier."""
    clauses = {spec.operator: Version(spec.version) for spec in specifier}
    if set(clauses) == {"=="}:
        return clauses["=="], None
    assert set(clauses) == {">=", "<"}, f"{specifier}: expected >=A,<B or ==A"
    return clauses[">="], clauses["<"]


def _only_major(requirement: Requirement) -> int:
    """The one major version ``requirement`` allows; fails if it allows several, or leaves it open."""
    lower, upper = _bounds(requirement.specifier)
    if upper is not None:
        assert upper == Version(str(lower.major + 1)), f"{requirement}: upper bound must be the next major"
    return lower.major


def _soname_major(needs: list[str], library: str) -> int:
    """N of ``library.so.N`` among a provider's NEEDED entries."""
    (major,) = [int(m.group(1)) for m in (re.fullmatch(rf"{library}\.so\.(\d+)", n) for n in needs) if m]
    return major


# ---------------------------------------------------------------------------------------------
# Offline: pyproject against the recorded stacks, the pins against the measured facts.


@pytest.mark.parametrize("stack_name", list(STACKS))
def test_extra_is_the_recorded_stack(stack_name):
    stack = STACKS[stack_name]
    extra = OPTIONAL[stack["extra"]]
    stack_names = {_name(line) for line in stack["requirements"]}
    assert [line for line in extra if _name(line) in stack_names] == stack["requirements"]
    assert {_name(line) for line in extra} - stack_names <= TOOLS
    assert set(stack["packages"].values()) <= stack_names


def test_every_gpu_extra_is_recorded():
    recorded = {stack["extra"] for stack in STACKS.values()}
    gpu_extras = {
        name for name, lines in OPTIONAL.items() if any(_name(line) == "cuda-python" for line in lines)
    }
    assert gpu_extras == recorded


@pytest.mark.parametrize("stack_name", WHEEL_STACKS)
def test_onnxruntime_is_the_measured_wheel_and_its_cuda_is_the_stacks(stack_name):
    stack, measured = STACKS[stack_name], STACKS[stack_name]["measured"]
    cuda = stack["cuda_major"]
    onnxruntime = _pin(stack, "onnxruntime")
    assert str(onnxruntime.specifier) == f"=={measured['onnxruntime_gpu']}", "the facts are this release's"
    assert measured["wheel"].startswith(f"onnxruntime_gpu-{measured['onnxruntime_gpu']}-")
    assert Version(measured["cuda_version"]).major == cuda
    for needs in (measured["cuda_provider_needs"], measured["tensorrt_provider_needs"]):
        assert _soname_major(needs, "libcudart") == cuda
        assert _soname_major(needs, "libcublas") == cuda


@pytest.mark.parametrize("stack_name", WHEEL_STACKS)
def test_cuda_libraries_are_the_ones_the_providers_link(stack_name):
    stack, measured = STACKS[stack_name], STACKS[stack_name]["measured"]
    cuda, built_with = stack["cuda_major"], Version(measured["cuda_version"])
    for role in ("cuda_runtime", "cublas"):
        pin = _pin(stack, role)
        assert _only_major(pin) == cuda, pin
        assert _bounds(pin.specifier)[0] >= built_with, f"{pin}: older than the CUDA it was built with"
    cudnn = _pin(stack, "cudnn")
    assert cudnn.name.endswith(f"-cu{cuda}")
    assert _only_major(cudnn) == _soname_major(measured["tensorrt_provider_needs"], "libcudnn")
    # Every library onnxruntime-gpu's own [cuda]/[cudnn] extras name is pinned, within their bounds.
    pins = {_name(line): Requirement(line) for line in stack["requirements"]}
    for line in measured["extras_require"]:
        wanted = Requirement(line)
        pin = pins[canonicalize_name(wanted.name)]
        lower, upper = _bounds(pin.specifier)
        assert lower in wanted.specifier, f"{pin} starts outside onnxruntime-gpu's {wanted}"
        assert upper is not None and upper.major == lower.major + 1, pin


@pytest.mark.parametrize("stack_name", WHEEL_STACKS)
def test_tensorrt_is_the_major_the_tensorrt_provider_links(stack_name):
    stack, measured = STACKS[stack_name], STACKS[stack_name]["measured"]
    tensorrt = _pin(stack, "tensorrt")
    needs = measured["tensorrt_provider_needs"]
    assert tensorrt.name == f"tensorrt-cu{stack['cuda_major']}", "TensorRT's build for the stack's CUDA"
    assert (
        _only_major(tensorrt) == _soname_major(needs, "libnvinfer") == _soname_major(needs, "libnvonnxparser")
    )
    lower, _ = _bounds(tensorrt.specifier)
    assert lower >= Version(measured["tensorrt_compiled_against"]), (
        "older than the provider was compiled against"
    )


@pytest.mark.parametrize("stack_name", list(STACKS))
def test_cuda_python_is_the_stacks_cuda_major(stack_name):
    stack = STACKS[stack_name]
    cuda_python = _pin(stack, "cuda_python")
    assert _only_major(cuda_python) == stack["cuda_major"]
    # cuda.bindings, which the native backend imports, exists from 12.6 on.
    assert _bounds(cuda_python.specifier)[0] >= Version("12.6")


# ---------------------------------------------------------------------------------------------
# The package index's answer. Resolution only: `pip install --dry-run --ignore-installed --report -`.


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT_S,
    )


def _dry_run(requirements: list[str], *options: str) -> dict[str, dict]:
    """Canonical name -> the report's entry, for what pip would install for ``requirements``."""
    result = _pip(
        "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-", *options, *requirements
    )
    assert result.returncode == 0, f"pip could not resolve {requirements}:\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout)
    return {canonicalize_name(item["metadata"]["name"]): item for item in report["install"]}


def _without_tensorrt(stack: dict) -> list[str]:
    tensorrt = canonicalize_name(stack["packages"]["tensorrt"])
    return [line for line in stack["requirements"] if _name(line) != tensorrt]


@pytest.fixture(scope="module")
def resolved() -> dict[str, dict[str, dict]]:
    """Per wheel stack, what its extra resolves to (TensorRT apart), and TensorRT's package alone.

    TensorRT's libraries come only from NVIDIA's index, so the stacks are resolved without them and
    each tensorrt-cuNN package on its own (``--no-deps``); test_tensorrt_libraries_resolve_from_nvidia
    covers the rest."""
    if not (sys.platform == "linux" and platform.machine() == "x86_64"):
        pytest.skip("the x86-64 stacks resolve to Linux x86-64 wheels; this is not such a machine")
    probe = _pip("index", "versions", "onnxruntime-gpu")
    if probe.returncode != 0:
        pytest.skip(f"the package index is unreachable, the stacks cannot be resolved: {probe.stderr[-500:]}")
    jobs = {}
    with ThreadPoolExecutor(max_workers=len(WHEEL_STACKS) + 1) as pool:
        for name in WHEEL_STACKS:
            stack = STACKS[name]
            jobs[name] = pool.submit(_dry_run, _without_tensorrt(stack))
        tensorrt = pool.submit(
            _dry_run, [str(_pin(STACKS[name], "tensorrt")) for name in WHEEL_STACKS], "--no-deps"
        )
        answers = {name: job.result() for name, job in jobs.items()}
    answers["tensorrt"] = tensorrt.result()
    return answers


@pytest.mark.slow
@pytest.mark.parametrize("stack_name", WHEEL_STACKS)
def test_index_resolves_the_stack_to_its_pins(resolved, stack_name):
    stack, measured = STACKS[stack_name], STACKS[stack_name]["measured"]
    cuda, installs = stack["cuda_major"], resolved[stack_name]
    for line in _without_tensorrt(stack):
        requirement = Requirement(line)
        version = installs[canonicalize_name(requirement.name)]["metadata"]["version"]
        assert requirement.specifier.contains(version, prereleases=True), f"{requirement.name} {version}"
    onnxruntime = installs["onnxruntime-gpu"]["metadata"]
    assert onnxruntime["version"] == measured["onnxruntime_gpu"]
    # The recorded extras are the release's own metadata, as the index serves it.
    assert [line for line in onnxruntime["requires_dist"] if line.startswith("nvidia-")] == measured[
        "extras_require"
    ]
    # cuda-python's bindings, and every CUDA library anything pulled in, are for the stack's CUDA.
    assert Version(installs["cuda-bindings"]["metadata"]["version"]).major == cuda
    for name, item in installs.items():
        suffix = re.search(r"-cu(\d+)$", name)
        assert suffix is None or int(suffix.group(1)) == cuda, f"{name} is for CUDA {suffix.group(1)}"
        if name in {"nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cuda-nvrtc", "nvidia-nvjitlink"} or (
            name.startswith(("nvidia-cuda-runtime-cu", "nvidia-cublas-cu", "nvidia-cuda-nvrtc-cu"))
        ):
            assert Version(item["metadata"]["version"]).major == cuda, f"{name} {item['metadata']['version']}"


@pytest.mark.slow
@pytest.mark.parametrize("stack_name", WHEEL_STACKS)
def test_index_resolves_tensorrt_to_the_providers_major(resolved, stack_name):
    stack, measured = STACKS[stack_name], STACKS[stack_name]["measured"]
    package = _pin(stack, "tensorrt").name
    metadata = resolved["tensorrt"][canonicalize_name(package)]["metadata"]
    version = Version(metadata["version"])
    assert version.major == _soname_major(measured["tensorrt_provider_needs"], "libnvinfer")
    assert version >= Version(measured["tensorrt_compiled_against"])
    # The package is a shell around the libraries package of the very same version.
    libraries = canonicalize_name(f"{package}-libs")
    assert any(
        canonicalize_name(Requirement(line).name) == libraries
        and str(Requirement(line).specifier) == f"=={version}"
        for line in metadata["requires_dist"]
    ), metadata["requires_dist"]


@pytest.mark.slow
def test_tensorrt_libraries_resolve_from_nvidia(resolved):
    index = os.environ.get("NVIDIA_INDEX_URL")
    if not index:
        pytest.skip("NVIDIA_INDEX_URL is not set: TensorRT's libraries (NVIDIA's index only) not resolved")
    try:
        urllib.request.urlopen(f"{index}/", timeout=10).close()
    except OSError as exc:
        pytest.skip(
            f"NVIDIA's package index {index} is unreachable ({exc}): TensorRT's libraries not resolved"
        )
    lines = []
    for name in WHEEL_STACKS:
        package = _pin(STACKS[name], "tensorrt").name
        version = resolved["tensorrt"][canonicalize_name(package)]["metadata"]["version"]
        lines.append(f"{package}-libs=={version}")
    installs = _dry_run(lines, "--no-deps", "--extra-index-url", index)
    for line in lines:
        item = installs[canonicalize_name(Requirement(line).name)]
        assert item["download_info"]["url"].endswith(".whl"), f"{line}: a real wheel, not the placeholder"
