"""Build the runtime image, run it, classify through it, stop it: the image test (make test-image).

    python deploy/image_test.py [--keep-engine] [--weights random|auto|imagenet] [--platform linux/arm64]

Steps, each of which fails loudly (never skips) when it cannot be done:

1. A container engine: `docker info` answers, or Debian's engine (package docker.io) is installed
   and dockerd started by hand (stopped again at the end unless --keep-engine).
2. A base image: python:3.11-slim when it is present or can be pulled, else a local stand-in made
   with debootstrap (Debian bookworm, its Python 3.11), passed as BASE_IMAGE.
3. `docker build --network host` of the default target. A local wheel directory that pip is
   configured with (find-links) is served on loopback and passed as PIP_FIND_LINKS, so that the
   export stage gets the CPU torch wheel from it.
4. Checks on the image: no torch (nor the ONNX exporter) importable, a numeric non-root user.
5. `docker run --network host` with a read-only root filesystem, as Kubernetes runs it: /readyz
   turns 200, one image is classified, /metrics counts it, the HEALTHCHECK reports healthy.
6. SIGTERM: the container exits with status 0, well within the drain bound.

Host networking only: traffic to an engine's private bridge addresses may be blocked on CI machines.

--platform linux/arm64 (make test-arm64) builds and runs the image for another architecture on this
one: qemu-user-static registered with binfmt_misc runs its binaries (the engine's BuildKit uses the
registration for the RUN steps, the engine for the container), the base image is an arm64 stand-in
(an arm64 debootstrap, labelled arm64 by a FROM-scratch build; a local tag holds one architecture),
and the export stage runs natively (EXPORT_BASE_IMAGE, this machine's base): ONNX files are the same
on every architecture. The container runs with /sys/devices/system/cpu hidden (EMULATED_RUN_OPTIONS).
Debian's engine builds it with its built-in BuildKit (DOCKER_BUILDKIT=1, no buildx plugin needed);
the classic builder has no BUILDPLATFORM and is not used. Emulated speed says nothing about ARM's.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "efficient-cnn-classifier:image-test"
CONTAINER = "efficient-cnn-image-test"
BASE_IMAGE = "python:3.11-slim"
STAND_IN_BASE = "efficient-cnn-base:bookworm-python3.11"
BUILD_TIMEOUT_S = 1800
READY_TIMEOUT_S = 180
STOP_LIMIT_S = 15.0  # SIGTERM to exit; the server's drain is bounded by SHUTDOWN_GRACE_S (20 s)
EMULATED_READY_TIMEOUT_S = 600  # models loaded and warmed under qemu: ~20x slower than native
# Docker's platform -> Debian's architecture and qemu's name for it.
PLATFORMS = {"linux/amd64": ("amd64", "x86_64"), "linux/arm64": ("arm64", "aarch64")}
# Under qemu-user (7.2, Debian 12's) /proc/cpuinfo is the host's x86 one while /sys lists the cores:
# the cpuinfo library inside ONNX Runtime then crashes the process at import (SIGSEGV, measured with
# qemu 7.2 and onnxruntime 1.32). Hiding the CPU list makes it log "failed to parse" and carry on,
# as it does wherever the list is absent. A real ARM machine shows its own /proc/cpuinfo.
EMULATED_CPU_LIST = "/sys/devices/system/cpu"
EMULATED_RUN_OPTIONS = ("--mount", f"type=tmpfs,destination={EMULATED_CPU_LIST}")


class ImageTestError(RuntimeError):
    """A step of the image test failed; the message says which and why."""


@dataclass(frozen=True)
class Target:
    """The platform an image is built and run for, and the names the test gives it there."""

    platform: str
    emulated: bool
    image: str = IMAGE
    container: str = CONTAINER
    export_base: str = ""  # an emulated build's export stage runs on this machine's base image

    @classmethod
    def of(cls, platform: str, native: str) -> Target:
        if platform == native:
            return cls(platform, emulated=False)
        arch = PLATFORMS[platform][0]
        return cls(platform, emulated=True, image=f"{IMAGE}-{arch}", container=f"{CONTAINER}-{arch}")


def log(message: str) -> None:
    print(f"image-test: {message}", flush=True)


def run(*args: str, timeout: float = 300, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise ImageTestError(f"{' '.join(args[:3])} ... exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


# ---------------------------------------------------------------------------------------------
# 1. Engine


def docker_client() -> str:
    """Debian's client when present: it builds with BuildKit without the buildx plugin."""
    if os.environ.get("DOCKER"):
        return os.environ["DOCKER"]
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and Path(candidate).is_file():
            return candidate
    return "docker"


def apt_install(*packages: str) -> None:
    if shutil.which("apt-get") is None:
        raise ImageTestError(f"{' '.join(packages)} missing and apt-get unavailable: install them")
    if os.geteuid() != 0:
        raise ImageTestError(f"{' '.join(packages)} missing: run as root (apt-get install) or install them")
    log(f"apt-get install {' '.join(packages)}")
    run("apt-get", "update", "-qq", timeout=600)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages, timeout=900, env=env)


def native_platform() -> str:
    machine = {
        "x86_64": "linux/amd64",
        "amd64": "linux/amd64",
        "aarch64": "linux/arm64",
        "arm64": "linux/arm64",
    }
    return machine.get(platform.machine().lower(), f"linux/{platform.machine().lower()}")


def ensure_emulation(target: str) -> None:
    """Let this machine run ``target``'s binaries: qemu-user-static's handler in binfmt_misc.

    The handler must carry the F flag (the interpreter opened when it is registered, as Debian's
    qemu-user-static does) so that chroots and containers, which do not see the host's files, can use it.
    """
    if target == native_platform():
        return
    if target not in PLATFORMS:
        raise ImageTestError(f"unknown platform {target!r} (known: {', '.join(PLATFORMS)})")
    qemu_arch = PLATFORMS[target][1]
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    handler = binfmt / f"qemu-{qemu_arch}"
    if not (binfmt / "register").exists():
        if os.geteuid() != 0:
            raise ImageTestError("binfmt_misc is not mounted and mounting it needs root")
        run("mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt))
    if not handler.exists():
        if shutil.which("update-binfmts") is None or not Path(f"/usr/bin/qemu-{qemu_arch}-static").exists():
            apt_install("qemu-user-static", "binfmt-support")
        run("update-binfmts", "--enable", f"qemu-{qemu_arch}", check=False)
    if not handler.exists():
        raise ImageTestError(f"no binfmt_misc handler {handler} after installing qemu-user-static")
    lines = handler.read_text().splitlines()
    flags = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("flags:")), "")
    if lines[:1] != ["enabled"] or "F" not in flags:
        raise ImageTestError(f"{handler} must be enabled with the F flag, is: {' '.join(lines[:3])}")


def engine_answers(client: str) -> bool:
    try:
        return run(client, "info", check=False, timeout=30).returncode == 0
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def engine(keep: bool) -> Iterator[str]:
    """A Docker client whose engine answers; starts Debian's dockerd when none does."""
    client = docker_client()
    if engine_answers(client):
        yield client
        return
    if shutil.which("dockerd") is None:
        apt_install("docker.io")
    client = docker_client()
    if os.geteuid() != 0:
        raise ImageTestError("no Docker engine answers and starting dockerd needs root")
    log("starting dockerd (host networking only)")
    log_file = tempfile.NamedTemporaryFile(prefix="dockerd-", suffix=".log", delete=False)  # noqa: SIM115
    daemon = subprocess.Popen(
        ["dockerd", "--iptables=false", "--ip6tables=false", "--bridge=none"],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not engine_answers(client):
            if daemon.poll() is not None or time.monotonic() > deadline:
                tail = Path(log_file.name).read_text(errors="replace")[-3000:]
                raise ImageTestError(f"dockerd did not start (a container engine cannot run here?):\n{tail}")
            time.sleep(0.5)
        yield client
    finally:
        if not keep:
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()


# ---------------------------------------------------------------------------------------------
# 2. Base image


def debian_mirror() -> str:
    """The Debian mirror apt uses on this machine (deb822 or one-line sources)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            words = line.split()
            urls = words[1:] if words[:1] == ["URIs:"] else words[1:2] if words[:1] == ["deb"] else []
            for url in urls:
                if url.rstrip("/").endswith("/debian"):
                    return url
    raise ImageTestError("no Debian mirror found in the apt sources (needed for debootstrap)")


def debootstrap_root(rootfs: str | Path, target: str, packages: str) -> None:
    """A minimal Debian bookworm for ``target`` (a Docker platform) in ``rootfs``, with ``packages``
    (comma-separated) and apt's downloads removed; another architecture's runs under emulation."""
    if shutil.which("debootstrap") is None:
        apt_install("debootstrap")
    ensure_emulation(target)
    run(
        "debootstrap",
        f"--arch={PLATFORMS[target][0]}",
        "--variant=minbase",
        f"--include={packages}",
        "bookworm",
        str(rootfs),
        debian_mirror(),
        timeout=1800,
    )
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for item in Path(rootfs, cache).glob("*"):
            if item.is_file():
                item.unlink()


# The stand-in base image's configuration, as python:3.11-slim's would give it.
STAND_IN_CONFIG = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
    'CMD ["python3"]',
)


def import_for_platform(client: str, rootfs: str | Path, tag: str, target: str) -> None:
    """``rootfs`` as the image ``tag`` for ``target``. Debian's engine (20.10) ignores `docker import
    --platform` outside experimental mode and labels the image with its own architecture, so the
    root goes in through BuildKit (FROM scratch, ADD), which labels it with the build's platform. /dev
    is left out: the engine provides it."""
    with tempfile.TemporaryDirectory(prefix="stand-in-") as context:
        run("tar", "-C", str(rootfs), "--exclude=./dev/*", "-cf", f"{context}/rootfs.tar", ".", timeout=600)
        Path(context, "Dockerfile").write_text(
            "\n".join(["FROM scratch", "ADD rootfs.tar /", *STAND_IN_CONFIG, ""])
        )
        env = {**os.environ, "DOCKER_BUILDKIT": "1"}
        result = run(
            client, "build", "--platform", target, "--tag", tag, context, timeout=900, check=False, env=env
        )
        if result.returncode != 0:
            raise ImageTestError(
                f"building {tag} from the root failed:\n{(result.stdout + result.stderr)[-4000:]}"
            )


def image_architecture(client: str, image: str) -> str | None:
    result = run(client, "image", "inspect", "--format", "{{.Architecture}}", image, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def base_image(client: str, target: str) -> str:
    """The base image for ``target``: python:3.11-slim when present or pullable for that platform, else
    the debootstrap stand-in (one local tag per platform: a local tag holds one architecture)."""
    arch = PLATFORMS[target][0]
    if image_architecture(client, BASE_IMAGE) == arch:
        return BASE_IMAGE
    emulated = target != native_platform()
    platform_args = ["--platform", target] if emulated else []
    pulled = run(client, "pull", *platform_args, BASE_IMAGE, check=False, timeout=300)
    if pulled.returncode == 0 and image_architecture(client, BASE_IMAGE) == arch:
        return BASE_IMAGE
    stand_in = f"{STAND_IN_BASE}-{arch}" if emulated else STAND_IN_BASE
    if image_architecture(client, stand_in) == arch:
        log(f"{BASE_IMAGE} cannot be pulled: using the stand-in {stand_in}")
        return stand_in
    log(
        f"{BASE_IMAGE} cannot be pulled: making {stand_in} with debootstrap "
        f"({'a few minutes under emulation' if emulated else 'about a minute'})"
    )
    with tempfile.TemporaryDirectory(prefix="rootfs-") as rootfs:
        debootstrap_root(rootfs, target, "python3,python3-pip,python3-venv,python-is-python3,ca-certificates")
        # pip inside the build must trust what this machine trusts (a TLS-inspecting proxy's CA).
        shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", f"{rootfs}/etc/ssl/certs/ca-certificates.crt")
        if emulated:
            import_for_platform(client, rootfs, stand_in, target)
        else:
            tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
            changes = [arg for change in STAND_IN_CONFIG for arg in ("--change", change)]
            imported = subprocess.run(
                [client, "import", *changes, "-", stand_in],
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                timeout=600,
            )
            tar.wait()
            if imported.returncode != 0:
                raise ImageTestError(f"docker import failed:\n{imported.stderr}")
    if image_architecture(client, stand_in) != arch:
        raise ImageTestError(f"{stand_in} was imported as {image_architecture(client, stand_in)}, not {arch}")
    return stand_in


# ---------------------------------------------------------------------------------------------
# 3. Build


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@contextlib.contextmanager
def wheel_server() -> Iterator[str | None]:
    """Serve pip's configured find-links directory on loopback, if it has one."""
    result = run(sys.executable, "-m", "pip", "config", "get", "global.find-links", check=False)
    directory = Path(result.stdout.strip()) if result.returncode == 0 and result.stdout.strip() else None
    if directory is None or not directory.is_dir():
        yield None
        return

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


def build(target: Target, client: str, base: str, weights: str, find_links: str | None) -> float:
    """Build the default target; for an emulated platform the export stage runs on ``export_base``
    (this machine's base image), natively."""
    args = [client, "build", "--network", "host", "--tag", target.image, "--build-arg", f"BASE_IMAGE={base}"]
    args += ["--build-arg", f"WEIGHTS={weights}"]
    if find_links:
        args += ["--build-arg", f"PIP_FIND_LINKS={find_links}"]
    if target.emulated:
        args += ["--platform", target.platform, "--build-arg", f"EXPORT_BASE_IMAGE={target.export_base}"]
    log(f"building {target.image} for {target.platform} (base {base}, weights {weights})")
    started = time.monotonic()
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    result = run(*args, str(ROOT), timeout=BUILD_TIMEOUT_S, check=False, env=env)
    if result.returncode != 0:
        raise ImageTestError(f"docker build failed:\n{(result.stdout + result.stderr)[-6000:]}")
    return time.monotonic() - started


# ---------------------------------------------------------------------------------------------
# 4-6. The image and the container


def check_image(target: Target, client: str) -> dict[str, object]:
    probe = (
        "import importlib.util, json, platform; "
        "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in "
        "('torch', 'torchvision', 'onnx', 'onnxscript', 'onnxruntime', 'fastapi')} | "
        "{'machine': platform.machine()}))"
    )
    found = json.loads(run(client, "run", "--rm", "--entrypoint", "python", target.image, "-c", probe).stdout)
    if found["machine"] != PLATFORMS[target.platform][1]:
        raise ImageTestError(f"the image runs as {found['machine']}, not {target.platform}")
    if found["torch"] or found["torchvision"] or found["onnx"] or found["onnxscript"]:
        raise ImageTestError(f"the runtime image carries build-time packages: {found}")
    if not (found["onnxruntime"] and found["fastapi"]):
        raise ImageTestError(f"the runtime image lacks serving packages: {found}")
    user = run(client, "image", "inspect", "--format", "{{.Config.User}}", target.image).stdout.strip()
    uid = user.split(":")[0]
    if not uid.isdigit() or int(uid) == 0:
        raise ImageTestError(f"the image's user must be numeric and non-root, is {user!r}")
    size = int(run(client, "image", "inspect", "--format", "{{.Size}}", target.image).stdout.strip())
    return {"user": user, "size_bytes": size}


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def test_jpeg(target: Target, client: str) -> bytes:
    """A JPEG made by Pillow inside the image (no host dependency)."""
    make = (
        "import io, sys; from PIL import Image; b = io.BytesIO(); "
        "Image.radial_gradient('L').convert('RGB').resize((320, 240)).save(b, 'JPEG'); "
        "sys.stdout.buffer.write(b.getvalue())"
    )
    result = subprocess.run(
        [client, "run", "--rm", "--entrypoint", "python", target.image, "-c", make],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return result.stdout


def inspect(target: Target, client: str, template: str) -> str:
    return run(client, "inspect", "--format", template, target.container).stdout.strip()


def serve_and_stop(target: Target, client: str) -> dict[str, object]:
    port = 8000 if port_free(8000) else free_port()
    command = [] if port == 8000 else ["python", "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    run(client, "rm", "--force", target.container, check=False)
    run(
        client,
        "run",
        "--detach",
        "--name",
        target.container,
        "--network",
        "host",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        *(EMULATED_RUN_OPTIONS if target.emulated else ()),
        target.image,
        *command,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        while (status := http_get(f"{base}/readyz")[0]) != 200:
            if inspect(target, client, "{{.State.Running}}") != "true" or time.monotonic() - started > (
                EMULATED_READY_TIMEOUT_S if target.emulated else READY_TIMEOUT_S
            ):
                logs = run(client, "logs", "--tail", "40", target.container, check=False)
                raise ImageTestError(f"/readyz never 200 (last {status}):\n{logs.stdout}{logs.stderr}")
            time.sleep(0.5)
        ready_s = time.monotonic() - started
        log(f"ready in {ready_s:.1f} s")

        request = urllib.request.Request(
            f"{base}/classify?model=shufflenet_v2&top_k=5",
            data=test_jpeg(target, client),
            headers={"Content-Type": "image/jpeg"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        if answer.get("model") != "shufflenet_v2" or len(answer.get("predictions", [])) != 5:
            raise ImageTestError(f"unexpected classification: {answer}")
        log(f"classified: {answer['predictions'][0]} via {answer['backend']}")

        status, body = http_get(f"{base}/metrics")
        wanted = 'classifier_requests_total{code="200",model="shufflenet_v2"} 1.0'
        if status != 200 or wanted not in body.decode():
            raise ImageTestError(f"/metrics does not count the request ({status}); wanted {wanted}")

        if port == 8000:  # the HEALTHCHECK probes the image's own port
            deadline = time.monotonic() + 60
            while (health := inspect(target, client, "{{.State.Health.Status}}")) != "healthy":
                if health == "unhealthy" or time.monotonic() > deadline:
                    raise ImageTestError(f"HEALTHCHECK status {health!r}")
                time.sleep(1)
            log("HEALTHCHECK: healthy")

        started = time.monotonic()
        run(client, "kill", "--signal", "TERM", target.container)
        run(client, "wait", target.container, timeout=60)
        stop_s = time.monotonic() - started
        code = int(inspect(target, client, "{{.State.ExitCode}}"))
        if code != 0 or stop_s > STOP_LIMIT_S:
            logs = run(client, "logs", "--tail", "20", target.container, check=False)
            raise ImageTestError(f"SIGTERM: exit {code} after {stop_s:.1f} s\n{logs.stdout}{logs.stderr}")
        log(f"SIGTERM: exited 0 in {stop_s:.2f} s")
        return {"ready_s": round(ready_s, 1), "stop_s": round(stop_s, 2), "backend": answer["backend"]}
    finally:
        run(client, "rm", "--force", target.container, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-engine", action="store_true", help="leave a dockerd started here running")
    parser.add_argument(
        "--weights", default="random", help="build argument WEIGHTS (default random: offline)"
    )
    parser.add_argument(
        "--platform",
        choices=sorted(PLATFORMS),
        default=native_platform(),
        help="build and run the image for this platform (another architecture runs under qemu-user)",
    )
    args = parser.parse_args(argv)
    target = Target.of(args.platform, native_platform())
    try:
        ensure_emulation(target.platform)
        with engine(args.keep_engine) as client:
            if target.emulated:
                target = Target(**{**vars(target), "export_base": base_image(client, native_platform())})
            base = base_image(client, target.platform)
            with wheel_server() as find_links:
                build_s = build(target, client, base, args.weights, find_links)
            image = check_image(target, client)
            served = serve_and_stop(target, client)
    except (ImageTestError, subprocess.SubprocessError) as exc:
        print(f"image-test: FAILED: {exc}", file=sys.stderr)
        print("image-test: 0 passed, 1 failed")
        return 1
    size_mb = image["size_bytes"] / 1e6
    log(
        f"image {target.image} ({target.platform}{' emulated' * target.emulated}): {size_mb:.0f} MB "
        f"(base {base}), user {image['user']}, built in {build_s:.0f} s"
    )
    log(f"no torch; ready in {served['ready_s']} s on {served['backend']}; SIGTERM exit {served['stop_s']} s")
    print("image-test: 1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
