"""What this machine can build: TensorRT, an NVIDIA GPU, a Jetson; and which GPU it is.

A target this machine cannot build for is refused before anything is written, with a message that names
what is missing and what to do: engines are specific to the GPU and TensorRT version that build them,
so the build never pretends.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from builder.precision import PrecisionError
from builder.tensorrt import TensorRTBuildError
from contract.gpu import GpuDevice, cuda_device


def tensorrt_problem() -> str | None:
    """Why TensorRT cannot be used here, or None."""
    try:
        import tensorrt
    except ImportError as exc:
        return (
            f"the TensorRT Python package 'tensorrt' is not importable ({exc}); install TensorRT 10 or 11 "
            "(pip install '.[gpu]' on x86-64, JetPack's python3-libnvinfer on a Jetson)"
        )
    from builder.tensorrt import check_version

    try:
        check_version(tensorrt.__version__)
    except TensorRTBuildError as exc:
        return str(exc)
    return None


def dla_support_problem() -> str | None:
    """Why the installed TensorRT cannot build for DLA, or None (checked from its version)."""
    import tensorrt

    from builder.tensorrt import dla_problem

    return dla_problem(tensorrt.__version__)


def nvidia_gpu_present() -> bool:
    if Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir()):
        return True
    return shutil.which("nvidia-smi") is not None and any(Path("/dev").glob("nvidia[0-9]*"))


# Signs of a Jetson, in the order they are tried. A container sees /proc/device-tree masked, so the
# first two are what works there: the L4T release file (the NVIDIA container runtime on Jetson mounts
# it; otherwise mount it read-only from the host) and the L4T core package, in images built on L4T.
NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
L4T_CORE_PACKAGE = "nvidia-l4t-core"
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")


def jetson_evidence() -> str | None:
    """What shows that this machine is a Jetson (for messages), or None."""
    if NV_TEGRA_RELEASE.is_file():
        return str(NV_TEGRA_RELEASE)
    version = _l4t_package_version()
    if version:
        return f"package {L4T_CORE_PACKAGE} {version}"
    try:
        model = DEVICE_TREE_MODEL.read_text(errors="ignore").strip("\x00 \n")
    except OSError:
        return None
    return f"{DEVICE_TREE_MODEL}: {model}" if "jetson" in model.lower() else None


def on_jetson() -> bool:
    return jetson_evidence() is not None


def _l4t_package_version() -> str | None:
    dpkg_query = shutil.which("dpkg-query")
    if dpkg_query is None:
        return None
    try:
        result = subprocess.run(
            [dpkg_query, "-W", "-f=${Status}|${Version}", L4T_CORE_PACKAGE],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    status, _, version = result.stdout.partition("|")
    # A removed package keeps an entry ("deinstall ok config-files"): only an installed one counts.
    if result.returncode != 0 or status.strip() != "install ok installed":
        return None
    return version.strip() or None


def check_target(args: argparse.Namespace, names: list[str]) -> list[str]:
    """Problems that prevent building for ``args.target`` here (empty: none), each saying what to do."""
    from builder.tensorrt import jetson_command

    problems: list[str] = []
    if args.target == "jetson" and not on_jetson():
        command = jetson_command(
            names, args.precision, args.max_batch, args.dla_core, args.calibration_images
        )
        # What else this machine lacks does not matter: the build has to happen over there.
        return [
            "this machine is not a Jetson. Jetson engines must be built on the Jetson itself "
            "(TensorRT engines are specific to the GPU and TensorRT version that build them and "
            f"cannot be cross-built). Copy the repository there and run: {command}"
        ]
    if args.target in ("gpu", "jetson"):
        trt = tensorrt_problem()
        if trt:
            problems.append(trt)
        elif args.dla_core is not None:
            dla = dla_support_problem()
            if dla:
                problems.append(dla)
        if args.target == "gpu" and not nvidia_gpu_present():
            problems.append(
                "no NVIDIA GPU found (no /proc/driver/nvidia/gpus entry or /dev/nvidia* device): run this "
                "on the machine whose GPU will serve the engines, with the NVIDIA driver installed"
            )
    if args.calibration_images is not None and "int8" in args.precision:
        from builder.precision import image_files

        try:
            image_files(args.calibration_images)
        except PrecisionError as exc:
            problems.append(str(exc))
    return problems


def detect_device() -> GpuDevice:
    """The GPU engines are built for: GPU 0 as CUDA (cuda-python) describes it, else as nvidia-smi does."""
    problems = []
    try:
        return cuda_device()
    except ImportError as exc:
        problems.append(f"cuda-python is not installed ({exc})")
    except RuntimeError as exc:  # GpuProbeError, or a CUDA error it did not expect
        problems.append(str(exc))
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
            name, cc = (part.strip() for part in out.splitlines()[0].split(",")[:2])
            return GpuDevice(name, cc)
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
            problems.append(f"nvidia-smi could not describe the GPU ({exc})")
    else:
        problems.append("nvidia-smi is not on PATH")
    raise TensorRTBuildError("cannot identify the GPU: " + "; ".join(problems))
