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


def nvidia_gpu_present() -> bool:
    if Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir()):
        return True
    return shutil.which("nvidia-smi") is not None and any(Path("/dev").glob("nvidia[0-9]*"))


def on_jetson() -> bool:
    if Path("/etc/nv_tegra_release").exists():
        return True
    model = Path("/proc/device-tree/model")
    try:
        return "jetson" in model.read_text(errors="ignore").lower()
    except OSError:
        return False


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
