"""The service on aarch64 under user-mode emulation, answering as it does on x86-64 (make test-arm64).

    python deploy/arm64_test.py [--fresh-root] [--keep]

Run as root on an x86-64 Debian machine. Steps, each of which fails loudly (never skips):

1. Emulation: qemu-user-static's aarch64 handler registered with binfmt_misc (Debian's packages
   installed and binfmt_misc mounted when missing).
2. An arm64 root: debootstrap --arch arm64 (Debian bookworm, its Python 3.11) into
   .cache/arm64/root, kept between runs (--fresh-root makes it again).
3. The runtime dependencies (deploy/requirements.py) installed into the root from aarch64 wheels
   (manylinux, cp311) by this machine's pip and its configured index, at the versions this machine's
   environment has, so that the architecture is the only difference. A requirement without an
   aarch64 wheel fails this step, named by pip.
4. A model repository built here (build_engines.py --weights random: the four models, and int8
   variants), copied into the root with the service's code.
5. On aarch64, for real: the CPU count and cgroup limit the server sizes its pools from, glibc's
   mallopt, SCHED_BATCH (service/process.py, service/core/cpus.py).
6. `python -m service` here and under emulation (chroot, uid 10001, in a private mount namespace
   with /proc, /sys and /dev), the same JPEGs to both: for every fp32 model the same top-5 classes
   and scores within 1e-4; the int8 variants answer, and their agreement is reported (see below).
   The emulated server's log holds no traceback and no error; SIGTERM ends it with status 0.

int8 is not held to the fp32 bar: ONNX Runtime's int8 kernels are not the same computation on the
two architectures. Measured with random weights, against ONNX Runtime's own unoptimised evaluation
of the same Q/DQ model: x86-64 (AVX2, no VNNI) off by up to 7.5 logits (ShuffleNet v2), arm64 by 0.3.
ONNX Runtime's documentation warns that its x86-64 uint8 x int8 kernels (VPMADDUBSW) can saturate;
that is the likely cause, not verified here. With near-flat random-weight logits the top-5 differ.

Emulated speed says nothing about ARM speed: the timings printed are the emulator's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from image_test import (  # a sibling script (deploy/ is not a package)
    ImageTestError,
    apt_install,
    debootstrap_root,
    ensure_emulation,
    free_port,
    http_get,
    run,
)

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "arm64"
ARM_ROOT = CACHE / "root"
REPOSITORY = CACHE / "model_repository"
PLATFORM = "linux/arm64"
SITE_PACKAGES = "/opt/site-packages"  # in the root: the runtime dependencies
APP = "/app"  # in the root: the service's code and the model repository
FP32_MODELS = ("mobilenet_v1", "mobilenet_v2", "shufflenet_v1", "shufflenet_v2")
INT8_MODELS = ("mobilenet_v2", "shufflenet_v2")
# The manylinux tags an aarch64 wheel for Debian bookworm (glibc 2.36) may carry.
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux2014_aarch64")
SCORE_TOLERANCE = 1e-4
READY_TIMEOUT_S = 600
STOP_TIMEOUT_S = 60
# REQUEST_TIMEOUT_S: an emulated inference takes seconds, more on a busy machine (the default is 10 s).
SERVER_ENV = {"LOG_FORMAT": "text", "GRPC_PORT": "0", "REQUEST_TIMEOUT_S": "300"}


class Arm64TestError(ImageTestError):
    """A step of the arm64 test failed; the message says which and why."""


def log(message: str) -> None:
    print(f"arm64-test: {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# 1-2. Emulation and the root


def arm64_root(fresh: bool) -> float:
    """The cached arm64 root, made when missing; seconds spent making it (0 when cached)."""
    done = ARM_ROOT / ".debootstrap-complete"
    if done.exists() and not fresh:
        log(f"arm64 root: {ARM_ROOT.relative_to(ROOT)} (cached)")
        return 0.0
    if shutil.which("debootstrap") is None:
        apt_install("debootstrap")
    shutil.rmtree(ARM_ROOT, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    log("arm64 root: debootstrap --arch arm64 under emulation (a few minutes, once)")
    started = time.monotonic()
    partial = Path(tempfile.mkdtemp(prefix="root-", dir=CACHE))
    try:
        debootstrap_root(partial, PLATFORM, "python3")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.chmod(0o755)  # mkdtemp's 0700 would lock uid 10001 out of its own root
    partial.rename(ARM_ROOT)  # whole or not at all: an interrupted run leaves no half-made root
    done.touch()
    return time.monotonic() - started


@contextlib.contextmanager
def in_root(
    *command: str, env: dict[str, str], user: str = "10001:10001", **popen
) -> Iterator[subprocess.Popen]:
    """``command`` run in the arm64 root as ``user``, in a mount namespace of its own: /proc, /dev and
    /sys (the cgroup files the server reads) as on this machine, the CPU list under /sys hidden.

    qemu-user 7.2 (Debian 12's) shows the host's x86 /proc/cpuinfo beside /sys's list of the cores,
    and the cpuinfo library in ONNX Runtime crashes on the mix (SIGSEGV at import); without the list
    it logs "failed to parse" and carries on, as it does wherever the list is absent. A real ARM
    machine has its own /proc/cpuinfo. The mounts end with the namespace: nothing is left mounted in
    the cache.
    """
    root = shlex.quote(str(ARM_ROOT))
    mounts = (
        f"mount -t proc proc {root}/proc && mount --rbind /dev {root}/dev && mount --rbind /sys {root}/sys"
        f" && mount -t tmpfs -o size=1m tmpfs {root}/sys/devices/system/cpu"
    )
    variables = [
        f"{key}={value}" for key, value in {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", **env}.items()
    ]
    shell = f'{mounts} && exec chroot --userspec={user} {root} /usr/bin/env -i "$@"'
    process = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, "sh", *variables, *command],
        **popen,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def run_in_root(*command: str, env: dict[str, str], timeout: float = 600) -> str:
    with in_root(*command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        out, err = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise Arm64TestError(
            f"{' '.join(command[:3])} ... in the arm64 root exited {process.returncode}:\n{err[-4000:]}"
        )
    return out


# ---------------------------------------------------------------------------------------------
# 3-4. Dependencies, code and models


def install_dependencies() -> list[str]:
    """The runtime requirements from aarch64 wheels into the root, pinned to this environment's
    versions; the installed distributions' names and versions."""
    requirements = run(sys.executable, str(ROOT / "deploy" / "requirements.py")).stdout
    pins = sorted(
        {
            f"{dist.metadata['Name']}=={dist.version}"
            for dist in importlib.metadata.distributions()
            if dist.metadata["Name"]
        }
    )
    stamp = ARM_ROOT / SITE_PACKAGES.lstrip("/") / ".installed-from"
    wanted = requirements + "".join(f"{pin}\n" for pin in pins)
    if stamp.exists() and stamp.read_text() == wanted:
        log("runtime dependencies: installed (cached)")
    else:
        target = ARM_ROOT / SITE_PACKAGES.lstrip("/")
        shutil.rmtree(target, ignore_errors=True)
        with tempfile.TemporaryDirectory() as scratch:
            (Path(scratch) / "requirements.txt").write_text(requirements)
            (Path(scratch) / "constraints.txt").write_text("".join(f"{pin}\n" for pin in pins))
            platforms = [arg for tag in WHEEL_PLATFORMS for arg in ("--platform", tag)]
            log("runtime dependencies: aarch64 wheels (cp311, manylinux) into the root")
            run(
                sys.executable, "-m", "pip", "install", "--quiet", "--no-warn-script-location",
                "--target", str(target), *platforms, "--python-version", "3.11", "--implementation", "cp",
                "--abi", "cp311", "--only-binary=:all:",
                "--requirement", f"{scratch}/requirements.txt",
                "--constraint", f"{scratch}/constraints.txt",
                timeout=1200,
            )  # fmt: skip
        stamp.write_text(wanted)
    installed = sorted(
        f"{dist.metadata['Name']}=={dist.version}"
        for dist in importlib.metadata.distributions(path=[str(ARM_ROOT / SITE_PACKAGES.lstrip("/"))])
    )
    return installed


def build_models() -> None:
    """The model repository, built on this machine (up-to-date outputs are skipped)."""
    build = [sys.executable, str(ROOT / "build_engines.py"), "--weights", "random", "--out", str(REPOSITORY)]
    log("model repository: build_engines.py --weights random (skips what is up to date)")
    run(*build, "--models", *FP32_MODELS, timeout=1800, cwd=ROOT)
    run(*build, "--models", *INT8_MODELS, "--precision", "fp32", "int8", timeout=1800, cwd=ROOT)


def copy_app() -> None:
    app = ARM_ROOT / APP.lstrip("/")
    shutil.rmtree(app, ignore_errors=True)
    for package in ("contract", "models", "service"):
        shutil.copytree(ROOT / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPOSITORY, app / "model_repository")


# ---------------------------------------------------------------------------------------------
# 5. The process tweaks on aarch64


PROBE = """
import json, logging, platform, threading
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from service.core.cpus import cgroup_cpu_limit, cpu_count
from service.process import release_large_blocks, stop_preempting
result = {"machine": platform.machine(), "cpu_count": cpu_count(), "cgroup_cpu_limit": cgroup_cpu_limit(),
          "mallopt": release_large_blocks()}
thread = threading.Thread(target=lambda: result.update(sched_batch=stop_preempting()))
thread.start(); thread.join()
print(json.dumps(result))
"""


def probe_process_tweaks() -> dict[str, object]:
    out = run_in_root("/usr/bin/python3", "-c", PROBE, env={"PYTHONPATH": f"{APP}:{SITE_PACKAGES}"})
    found = json.loads(out.strip().splitlines()[-1])
    if found["machine"] != "aarch64":
        raise Arm64TestError(f"the root's Python runs as {found['machine']}, not aarch64")
    if not (found["mallopt"] and found["sched_batch"] and found["cpu_count"] >= 1):
        raise Arm64TestError(f"a process tweak did not apply on aarch64: {found}")
    return found


# ---------------------------------------------------------------------------------------------
# 6. Both servers, the same JPEGs


def test_images() -> list[tuple[str, bytes]]:
    from contract.photos import photo_jpeg

    sizes = [(500, 375, seed) for seed in range(4)] + [(224, 224, 4), (640, 480, 5)]
    return [(f"photo_{seed}_{w}x{h}.jpg", photo_jpeg(w, h, seed)) for w, h, seed in sizes]


def classify(port: int, model: str, image: bytes) -> list[dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/classify?model={model}&top_k=5",
        data=image,
        headers={"Content-Type": "image/jpeg"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())["predictions"]


def wait_ready(process: subprocess.Popen, port: int, log_path: Path) -> float:
    started = time.monotonic()
    while (status := http_get(f"http://127.0.0.1:{port}/readyz")[0]) != 200:
        if process.poll() is not None or time.monotonic() - started > READY_TIMEOUT_S:
            tail = log_path.read_text(errors="replace")[-4000:]
            raise Arm64TestError(f"/readyz never 200 (last {status}, exit {process.poll()}):\n{tail}")
        time.sleep(1)
    return time.monotonic() - started


def stop(process: subprocess.Popen, log_path: Path) -> None:
    process.terminate()
    try:
        code = process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise Arm64TestError(f"SIGTERM: still running after {STOP_TIMEOUT_S} s") from exc
    if code != 0:
        raise Arm64TestError(f"SIGTERM: exit {code}:\n{log_path.read_text(errors='replace')[-3000:]}")


def answers(
    port: int, models: list[str], images: list[tuple[str, bytes]]
) -> dict[tuple[str, str], list[dict]]:
    return {(model, name): classify(port, model, data) for model in models for name, data in images}


def serve_x86(models: list[str], images: list[tuple[str, bytes]], logs: Path) -> dict:
    port = free_port()
    env = {**os.environ, **SERVER_ENV, "MODEL_REPOSITORY": str(REPOSITORY)}
    log_path = logs / "x86_64.log"
    with log_path.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            ready_s = wait_ready(process, port, log_path)
            log(f"x86_64: ready in {ready_s:.1f} s")
            result = answers(port, models, images)
            stop(process, log_path)
            return result
        finally:
            if process.poll() is None:
                process.kill()


def serve_arm64(models: list[str], images: list[tuple[str, bytes]], logs: Path) -> tuple[dict, dict]:
    port = free_port()
    env = {
        **SERVER_ENV,
        "PYTHONPATH": f"{APP}:{SITE_PACKAGES}",
        "MODEL_REPOSITORY": f"{APP}/model_repository",
    }
    log_path = logs / "aarch64.log"
    command = ("/usr/bin/python3", "-m", "service", "--host", "127.0.0.1", "--port", str(port))
    with (
        log_path.open("w") as out,
        in_root(*command, env=env, stdout=out, stderr=subprocess.STDOUT) as process,
    ):
        ready_s = wait_ready(process, port, log_path)
        log(f"aarch64 (emulated): ready in {ready_s:.1f} s")
        started = time.monotonic()
        result = answers(port, models, images)
        classify_s = time.monotonic() - started
        stop(process, log_path)
    server_log = log_path.read_text(errors="replace")
    problems = [
        line
        for line in server_log.splitlines()
        if "Traceback" in line or " ERROR " in line or " CRITICAL " in line
    ]
    if problems:
        raise Arm64TestError("the emulated server logged errors:\n" + "\n".join(problems[:20]))
    return result, {"ready_s": round(ready_s, 1), "classify_s": round(classify_s, 1)}


def compare(x86: dict, arm: dict, int8: set[str]) -> dict[str, dict]:
    """Per model: images, top-5 matches, top-1 matches, the largest score difference. Raises where an
    fp32 model's answers differ beyond the tolerance."""
    summary: dict[str, dict] = {}
    failures = []
    for (model, image), here in x86.items():
        there = arm[(model, image)]
        same_top5 = [p["class_id"] for p in here] == [p["class_id"] for p in there]
        diff = max(abs(p["score"] - q["score"]) for p, q in zip(here, there, strict=True))
        row = summary.setdefault(model, {"images": 0, "same_top5": 0, "same_top1": 0, "max_score_diff": 0.0})
        row["images"] += 1
        row["same_top5"] += same_top5
        row["same_top1"] += here[0]["class_id"] == there[0]["class_id"]
        row["max_score_diff"] = max(row["max_score_diff"], diff)
        if model not in int8 and (not same_top5 or diff > SCORE_TOLERANCE):
            failures.append(f"{model} {image}: x86_64 {here} / aarch64 {there}")
    if failures:
        raise Arm64TestError("aarch64 answers differ from x86_64:\n" + "\n".join(failures[:10]))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh-root", action="store_true", help="make the cached arm64 root again")
    parser.add_argument("--logs", type=Path, default=CACHE / "logs", help="where both servers' logs go")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        if os.geteuid() != 0:
            raise Arm64TestError("run as root: debootstrap, binfmt_misc, chroot and mounts need it")
        ensure_emulation(PLATFORM)
        root_s = arm64_root(args.fresh_root)
        installed = install_dependencies()
        build_models()
        copy_app()
        tweaks = probe_process_tweaks()
        log(f"on aarch64: {tweaks}")
        args.logs.mkdir(parents=True, exist_ok=True)
        models = [*FP32_MODELS, *(f"{model}:int8" for model in INT8_MODELS)]
        images = test_images()
        x86 = serve_x86(models, images, args.logs)
        arm, timings = serve_arm64(models, images, args.logs)
        summary = compare(x86, arm, {f"{model}:int8" for model in INT8_MODELS})
    except (ImageTestError, subprocess.SubprocessError, OSError) as exc:
        print(f"arm64-test: FAILED: {exc}", file=sys.stderr)
        print("arm64-test: 0 passed, 1 failed")
        return 1
    log(f"runtime dependencies from aarch64 wheels: {', '.join(installed)}")
    for model, row in summary.items():
        kind = "int8, reported" if model.endswith(":int8") else "fp32, held to the same top-5 and 1e-4"
        log(
            f"{model:20} {row['same_top5']}/{row['images']} same top-5, {row['same_top1']}/{row['images']} "
            f"same top-1, max |score diff| {row['max_score_diff']:.2g} ({kind})"
        )
    log(
        f"emulated server: ready in {timings['ready_s']} s, {len(images) * len(models)} classifications in "
        f"{timings['classify_s']} s (the emulator's speed, not ARM's); root made in {root_s:.0f} s; "
        f"whole test {time.monotonic() - started:.0f} s"
    )
    print("arm64-test: 1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
