"""The deployment artifacts: Kubernetes manifests, docker-compose, the Dockerfile, their helper scripts.

Kubernetes: every overlay must build with ``kubectl kustomize`` and pass strict schema validation
(``kubernetes-validate --strict``: a misspelt field fails) for the built-in kinds; the ServiceMonitor,
a CRD the validator only warns about, is checked against deploy/schemas/servicemonitor-v1.json. On top
of the schemas, the contracts: no container runs as root or without limits, probes hit routes the app
has on the port the Service targets, SIGKILL comes after the preStop sleep and the server's drain.
Compose: ``docker-compose config`` and the Compose specification schema. Dockerfile: hadolint plus the
contracts of the issue (no torch in the runtime stage, non-root, exec-form HEALTHCHECK on /healthz).

The tools come from deploy/install-test-tools.sh (run by make test). The image itself is built and
run by the image test, not here.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu", "jetson")
KUBERNETES_VERSION = "1.32.0"
SERVICEMONITOR_SCHEMA = REPO / "deploy" / "schemas" / "servicemonitor-v1.json"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT = REPO / "deploy" / "entrypoint.sh"
INSTALL_HINT = "run deploy/install-test-tools.sh (make test does)"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", REPO / "deploy" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


requirements_script = _load_script("requirements")
sync_dashboards = _load_script("sync_dashboards")


# ---------------------------------------------------------------------------------------------
# Helpers


def _tool(name: str) -> str:
    """An executable from the virtualenv (pip-installed tools) or PATH; missing fails, never skips."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: {INSTALL_HINT}")
    return found


def _run(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _kustomize(directory: Path) -> list[dict[str, Any]]:
    result = _run(_tool("kubectl"), "kustomize", str(directory))
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@functools.cache
def _overlay(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(_kustomize(K8S / "overlays" / name))


def _docs(name: str) -> list[dict[str, Any]]:
    """The built overlay (a deep copy, so that tests may change it)."""
    return copy.deepcopy(list(_overlay(name)))


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(docs, "Deployment")["spec"]["template"]["spec"]


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _server(pod: dict[str, Any]) -> dict[str, Any]:
    (server,) = [c for c in pod["containers"] if c["name"] == "classifier"]
    return server


def _config(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The environment a container gets from its ConfigMaps (envFrom) and literal env values."""
    maps = {doc["metadata"]["name"]: doc.get("data", {}) for doc in docs if doc["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    env.update({var["name"]: var["value"] for var in container.get("env", []) if "value" in var})
    return env


@functools.cache
def _app():
    """The FastAPI app, as the server builds it; nothing is loaded."""
    from service.app import create_app
    from service.config import Settings

    return create_app(Settings(model_repository=REPO / "model_repository", warmup=False))


def _app_serves(path: str, method: str = "GET") -> bool:
    """Whether the app routes ``method path`` to a handler."""
    app = _app()
    from starlette.routing import Match

    scope = {
        "type": "http",
        "path": path,
        "method": method,
        "root_path": "",
        "headers": [],
        "query_string": b"",
    }
    return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)


def test_route_check_tells_served_from_unknown_paths():
    assert _app_serves("/healthz") and _app_serves("/readyz") and _app_serves("/metrics")
    assert not _app_serves("/no-such-route")


def _port_number(container: dict[str, Any], port: int | str) -> int:
    """A container port referred to by number or by name (the name must exist)."""
    if isinstance(port, int):
        assert port in {p["containerPort"] for p in container.get("ports", [])}, f"{port} not declared"
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"port name {port!r} not declared by container {container['name']}"
    return named[port]


# ---------------------------------------------------------------------------------------------
# Kubernetes: build and schemas


def test_every_overlay_is_tested():
    assert sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir()) == sorted(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_with_every_resource(overlay):
    kinds = sorted(doc["kind"] for doc in _overlay(overlay))
    assert kinds == sorted(
        [
            "ConfigMap",  # settings
            "ConfigMap",  # Grafana dashboard
            "Deployment",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ]
    )


def _with_queue_depth_component(tmp_path: Path) -> list[dict[str, Any]]:
    return _with_component(tmp_path, "queue-depth-autoscaling")


def _with_component(tmp_path: Path, name: str) -> list[dict[str, Any]]:
    """The cpu overlay with the component ``name`` added, built."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(K8S / "overlays" / "cpu", overlay)
    component = os.path.relpath(K8S / "components" / name, overlay)
    (overlay / "kustomization.yaml").write_text(
        f"resources:\n  - {base}\ncomponents:\n  - {component}\n", encoding="utf-8"
    )
    return _kustomize(overlay)


def _validate_builtin(docs: list[dict[str, Any]]) -> int:
    import kubernetes_validate

    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: test_servicemonitor_matches_schema
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"no schema for {doc['apiVersion']} {doc['kind']}: not a built-in kind of 1.32")
        checked += 1
    return checked


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_pass_strict_validation(overlay):
    assert _validate_builtin(_docs(overlay)) == 8


def test_queue_depth_component_builds_and_validates(tmp_path):
    docs = _with_queue_depth_component(tmp_path)
    assert _validate_builtin(docs) == 8
    metrics = _one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Resource", "Pods"]
    assert metrics[1]["pods"]["metric"]["name"] == "classifier_queue_depth"


def test_shared_model_repository_component_mounts_one_volume_read_only_in_every_pod(tmp_path):
    docs = _with_component(tmp_path, "shared-model-repository")
    assert _validate_builtin(docs) == 9  # the overlay's 8 and the PersistentVolumeClaim
    claim = _one(docs, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every pod, on any node, mounts it"
    pod = _pod_spec(docs)
    server = _server(pod)
    config = _config(docs, server)
    (mount,) = [m for m in server["volumeMounts"] if m["mountPath"] == config["MODEL_REPOSITORY"]]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
    # Loading stays behind kubectl exec (SIGHUP): no unauthenticated repository API.
    assert config["REPOSITORY_API"] == "false" and "AUTH_TOKEN" not in config
    # What the overlay had stays: the scratch /tmp, the probes, the rollout.
    assert any(m["mountPath"] == "/tmp" for m in server["volumeMounts"])
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert config["MODEL_REPOSITORY"] != "/app/model_repository"


def test_strict_validation_catches_a_misspelt_field():
    import kubernetes_validate

    deployment = _one(_docs("cpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def _servicemonitor_validator():
    import jsonschema

    schema = json.loads(SERVICEMONITOR_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_matches_schema_and_service(overlay):
    docs = _docs(overlay)
    monitor = _one(docs, "ServiceMonitor")
    errors = [f"{list(e.path)}: {e.message}" for e in _servicemonitor_validator().iter_errors(monitor)]
    assert not errors, errors
    service = _one(docs, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items(), (
        "ServiceMonitor does not select the Service"
    )
    port_names = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert _app_serves(endpoint["path"])
        assert endpoint["path"] == "/metrics"


@pytest.mark.parametrize(
    ("where", "field"),
    [(("spec", "endpoints", 0), "intervall"), (("spec",), "namespaceSelecter"), (("metadata",), "label")],
)
def test_servicemonitor_schema_rejects_unknown_fields(where, field):
    monitor = _one(_docs("cpu"), "ServiceMonitor")
    node = monitor
    for key in where:
        node = node[key]
    node[field] = "15s"
    assert list(_servicemonitor_validator().iter_errors(monitor))


# ---------------------------------------------------------------------------------------------
# Kubernetes: contracts beyond the schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_container_runs_as_root_or_unbounded(overlay):
    pod = _pod_spec(_docs(overlay))
    pod_security = pod["securityContext"]
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    mounted_volumes = {v["name"]: v for v in pod["volumes"]}
    for container in _containers(pod):
        name = container["name"]
        security = {**pod_security, **container.get("securityContext", {})}
        assert security.get("runAsNonRoot") is True, name
        assert security.get("runAsUser", 0) != 0, name
        assert security.get("allowPrivilegeEscalation") is False, name
        assert security.get("readOnlyRootFilesystem") is True, name
        assert security.get("privileged", False) is False, name
        assert "ALL" in security.get("capabilities", {}).get("drop", []), name
        limits = container.get("resources", {}).get("limits", {})
        requests = container.get("resources", {}).get("requests", {})
        assert {"cpu", "memory"} <= limits.keys(), f"{name}: limits {limits}"
        assert {"cpu", "memory"} <= requests.keys(), f"{name}: requests {requests}"
        # A read-only root needs somewhere to scratch: /tmp is an emptyDir.
        tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in mounted_volumes[tmp[0]["name"]], f"{name}: no emptyDir on /tmp"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_hit_app_routes_on_the_service_port(overlay):
    docs = _docs(overlay)
    pod = _pod_spec(docs)
    server = _server(pod)
    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe_name, path in expected.items():
        probe = server[probe_name]["httpGet"]
        assert probe["path"] == path, probe_name
        assert _app_serves(probe["path"]), f"{probe_name} path {probe['path']} is not a route of the app"
        assert _port_number(server, probe["port"]) == 8000, probe_name
    # Room for loading and warming every model before the kubelet restarts the container.
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180
    # The Service forwards to the port the server listens on (the image's CMD: --port 8000).
    service = _one(docs, "Service")
    assert service["spec"]["selector"].items() <= pod_labels(docs).items()
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert set(ports) == {"http", "grpc"}
    assert _port_number(server, ports["http"]["targetPort"]) == 8000


def _grpc_port(docs: list[dict[str, Any]], container: dict[str, Any]) -> int:
    """The port the server serves gRPC on: GRPC_PORT as the pod sets it, else the server's default."""
    from service.config import Settings

    return int(_config(docs, container).get("GRPC_PORT", Settings.model_fields["grpc_port"].default))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_port_is_exposed_for_h2c(overlay):
    """The Open Inference Protocol over gRPC: the container declares the port the server opens, and the
    Service forwards it as HTTP/2 without TLS (appProtocol kubernetes.io/h2c), so that gateways and
    meshes proxy it as gRPC."""
    docs = _docs(overlay)
    server = _server(_pod_spec(docs))
    assert _port_number(server, "grpc") == _grpc_port(docs, server) == 8001
    ports = {port["name"]: port for port in _one(docs, "Service")["spec"]["ports"]}
    grpc = ports["grpc"]
    assert grpc["port"] == 8001 and grpc.get("protocol", "TCP") == "TCP"
    assert grpc["appProtocol"] == "kubernetes.io/h2c"
    assert _port_number(server, grpc["targetPort"]) == 8001
    # The probes stay on HTTP: the gRPC port is no health endpoint.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert _port_number(server, server[probe]["httpGet"]["port"]) == 8000


def pod_labels(docs: list[dict[str, Any]]) -> dict[str, str]:
    return _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sigkill_comes_after_the_prestop_sleep_and_the_drain(overlay):
    docs = _docs(overlay)
    pod = _pod_spec(docs)
    server = _server(pod)
    pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(_config(docs, server)["SHUTDOWN_GRACE_S"])
    assert pre_stop >= 5, "the endpoint removal needs a few seconds to propagate"
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_rollout_keeps_serving(overlay):
    """A new image rolls out without dropping below the capacity serving now: a new pod starts first
    (maxSurge 1), takes traffic only once /readyz says its models are loaded and warmed, and only then
    is an old one stopped (maxUnavailable 0), which leaves the endpoints before SIGTERM (preStop) and
    drains before SIGKILL (test_sigkill_comes_after_the_prestop_sleep_and_the_drain)."""
    docs = _docs(overlay)
    deployment = _one(docs, "Deployment")
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    server = _server(_pod_spec(docs))
    for probe in ("startupProbe", "readinessProbe"):
        assert server[probe]["httpGet"]["path"] == "/readyz", probe
    # /readyz waits for the warm-up only when there is one: a rollout must not turn it off.
    from service.config import Settings

    warmup = _config(docs, server).get("WARMUP")
    assert Settings.model_fields["warmup"].default is True
    assert warmup is None or Settings(model_repository=REPO, warmup=warmup).warmup
    assert server["lifecycle"]["preStop"]["sleep"]["seconds"] >= 5


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaling_disruption_budget_and_spread_select_the_pods(overlay):
    docs = _docs(overlay)
    labels = pod_labels(docs)
    deployment = _one(docs, "Deployment")
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "classifier",
    }
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu, "the HPA scales on CPU"
    # The CPU target is a share of the request: every container must request CPU.
    assert all(
        "cpu" in c["resources"]["requests"] for c in deployment["spec"]["template"]["spec"]["containers"]
    )
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} >= {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(c["labelSelector"]["matchLabels"].items() <= labels.items() for c in spread)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_http_and_grpc_and_allows_only_dns_out(overlay):
    docs = _docs(overlay)
    policy = _one(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels(docs).items()
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    server = _server(_pod_spec(docs))
    for rule in policy["ingress"]:
        assert [_port_number(server, p["port"]) for p in rule["ports"]] == [8000, _grpc_port(docs, server)]
        assert rule["from"], "an empty 'from' would admit every source"
    sources = [peer for rule in policy["ingress"] for peer in rule["from"]]
    assert {"podSelector": {}} in sources  # same namespace
    assert any(
        peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") == "prometheus"
        for peer in sources
    )
    egress_ports = {(p["port"], p["protocol"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress_ports == {(53, "UDP"), (53, "TCP")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grafana_dashboard_configmap_for_the_sidecar(overlay):
    docs = _docs(overlay)
    (dashboard,) = [
        d for d in docs if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]
    ]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["name"] == "classifier-grafana-dashboard"  # stable: no hash suffix
    assert list(dashboard["data"]) == ["classifier.json"]
    content = json.loads(dashboard["data"]["classifier.json"])
    assert content["uid"] and content["title"]
    assert len(dashboard["data"]["classifier.json"].encode()) < 900_000, "ConfigMaps are limited to 1 MiB"


def test_dashboard_copy_matches_monitoring():
    if not list(sync_dashboards.SOURCE.glob("*.json")):
        pytest.skip("monitoring/grafana/dashboards/ has no dashboard yet: the placeholder copy stays")
    assert sync_dashboards.stale() == [], "stale copy: run python deploy/sync_dashboards.py"


def test_dashboard_sync_mirrors_source(tmp_path):
    source, target = tmp_path / "source", tmp_path / "copy"
    source.mkdir()
    target.mkdir()
    (source / "a.json").write_text('{"uid": "a"}')
    (target / "a.json").write_text('{"uid": "old"}')
    (target / "gone.json").write_text("{}")
    assert sync_dashboards.stale(source, target) == ["a.json", "gone.json"]
    assert sync_dashboards.sync(source, target) == ["a.json", "gone.json"]
    assert sorted(p.name for p in target.iterdir()) == ["a.json"]
    assert (target / "a.json").read_text() == '{"uid": "a"}'
    assert sync_dashboards.stale(source, target) == []


def test_gpu_overlay_builds_engines_on_the_node_and_requests_a_gpu():
    docs = _docs("gpu")
    pod = _pod_spec(docs)
    (init,) = pod["initContainers"]
    server = _server(pod)
    assert init["image"] == server["image"] and server["image"].endswith("-gpu")
    assert init["args"] == ["build-engines"]
    for container in (init, server):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        env = _config(docs, container)
        assert env["ENGINE_TARGET"] == "gpu"
        assert env["MODEL_REPOSITORY"] == "/models"
    mounts = {c["name"]: {m["mountPath"]: m for m in c["volumeMounts"]} for c in (init, server)}
    assert mounts["build-engines"]["/models"]["name"] == "engine-cache"
    assert mounts["classifier"]["/models"] == {
        "name": "engine-cache",
        "mountPath": "/models",
        "readOnly": True,
    }
    assert _config(docs, server)["SKIP_ENGINE_BUILD"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_gpu_overlay_gives_the_server_a_writable_engine_cache_volume():
    """ONNX Runtime's TensorRT provider writes its engines to ENGINE_CACHE_DIR: a mounted, writable volume
    of its own, since the root filesystem and /models are read-only."""
    docs = _docs("gpu")
    pod = _pod_spec(docs)
    server = _server(pod)
    cache_dir = _config(docs, server)["ENGINE_CACHE_DIR"]
    (mount,) = [m for m in server["volumeMounts"] if m["mountPath"] == cache_dir]
    assert not mount.get("readOnly", False)
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["name"] not in ("engine-cache", "tmp") and "emptyDir" in volume
    assert server["securityContext"]["readOnlyRootFilesystem"] is True


def test_jetson_overlay_selects_arm64_with_the_nvidia_runtime():
    docs = _docs("jetson")
    pod = _pod_spec(docs)
    assert pod["nodeSelector"] == {"kubernetes.io/arch": "arm64"}
    assert pod["runtimeClassName"] == "nvidia"
    (init,) = pod["initContainers"]
    server = _server(pod)
    assert init["image"] == server["image"] and server["image"].endswith("-jetson")
    assert init["args"] == ["build-engines"]
    assert _config(docs, init)["ENGINE_TARGET"] == "jetson"


def test_cpu_overlay_serves_the_baked_models():
    docs = _docs("cpu")
    pod = _pod_spec(docs)
    assert "initContainers" not in pod
    server = _server(pod)
    assert ":" in server["image"] and not server["image"].endswith(("-gpu", "-jetson"))
    assert "args" not in server and "command" not in server, "the image's CMD starts the server"
    assert _config(docs, server)["BACKEND"] == "onnxruntime-cpu"
    # The pools are sized by the server from the pod's CPU limit (its cgroup quota: service/config.py
    # cpu_count), so the pod states the limit and leaves the pool sizes to their defaults.
    assert float(server["resources"]["limits"]["cpu"]) >= 1
    names = {var["name"] for var in server.get("env", [])} | _config(docs, server).keys()
    assert names.isdisjoint({"DECODE_THREADS", "MAX_CONCURRENT_BATCHES"})


@pytest.mark.parametrize("overlay", ["gpu", "jetson"])
def test_accelerator_overlays_keep_the_gpu_batching_defaults(overlay):
    docs = _docs(overlay)
    server = _server(_pod_spec(docs))
    names = {var["name"] for var in server.get("env", [])} | _config(docs, server).keys()
    assert names.isdisjoint({"MAX_BATCH_SIZE", "MAX_QUEUE_DELAY_MS", "MAX_CONCURRENT_BATCHES"})


# ---------------------------------------------------------------------------------------------
# docker-compose


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.mark.parametrize("profiles", [(), ("load", "gpu")], ids=["default", "all-profiles"])
def test_compose_config_is_valid(profiles):
    args = [_tool("docker-compose"), "--file", str(COMPOSE_FILE)]
    for profile in profiles:
        args += ["--profile", profile]
    env = {k: v for k, v in os.environ.items() if k != "GRAFANA_ADMIN_PASSWORD"}
    result = _run(*args, "config", "--quiet", env=env)
    assert result.returncode == 0, result.stderr


def test_compose_matches_the_compose_specification():
    result = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


def _healthcheck_path(test: list[str]) -> str:
    assert test[0] == "CMD", "exec form (no shell in the check)"
    match = re.search(r"https?://[^/'\"]+(/[^'\" )]*)", " ".join(test))
    assert match, test
    return match.group(1)


def test_compose_services_and_start_order():
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"classifier", "prometheus", "grafana", "load", "classifier-gpu"}
    assert "profiles" not in services["classifier"]
    assert services["load"]["profiles"] == ["load"]
    assert services["classifier-gpu"]["profiles"] == ["gpu"]
    # Health-gated start: Prometheus after a ready classifier, Grafana after Prometheus, load last.
    assert services["prometheus"]["depends_on"] == {"classifier": {"condition": "service_healthy"}}
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    assert services["load"]["depends_on"] == {"classifier": {"condition": "service_healthy"}}
    for name in ("classifier", "classifier-gpu"):
        assert _app_serves(_healthcheck_path(services[name]["healthcheck"]["test"]))
    # Compose's SIGKILL comes after the server's drain.
    for name in ("classifier", "classifier-gpu"):
        grace = int(services[name]["stop_grace_period"].rstrip("s"))
        assert grace > float(services[name]["environment"]["SHUTDOWN_GRACE_S"])


def test_compose_volumes_are_named_and_mounts_exist():
    compose = _compose()
    declared = set(compose["volumes"])
    used = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                if source == "./monitoring/grafana/dashboards" and not (REPO / source).exists():
                    continue  # generated by the monitoring work; Grafana then starts without it
                assert (REPO / source).is_dir(), f"{name}: bind mount {source} does not exist"
            else:
                used.add(source)
    assert used == declared, "every named volume declared and used"


def test_compose_grafana_is_anonymous_read_only_with_admin_password_from_env():
    grafana = _compose()["services"]["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD")
    mounts = {v.split(":")[1] for v in grafana["volumes"]}
    assert {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards"} <= mounts
    # With a default admin password, Grafana must not listen beyond this machine.
    assert all(port.startswith("127.0.0.1:") for port in grafana["ports"])


def test_compose_load_profile_sweeps_all_models():
    load = _compose()["services"]["load"]
    assert load["build"]["target"] == "loadgen"
    assert load["command"] == shlex.split(
        "--url http://classifier:8000 --models all --duration 60 --concurrency 1,4,16"
    )


def _published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port, from a service's ``ports`` ([IP:]HOST:CONTAINER each)."""
    published = {}
    for entry in service["ports"]:
        host, container = entry.rsplit(":", 1)
        published[int(container)] = int(host.rsplit(":", 1)[-1])
    return published


def test_compose_publishes_http_and_grpc_on_distinct_host_ports():
    services = _compose()["services"]
    hosts = []
    for name in ("classifier", "classifier-gpu"):
        service = services[name]
        grpc_port = int(service["environment"]["GRPC_PORT"])
        published = _published(service)
        assert set(published) == {8000, grpc_port}, name
        assert grpc_port == 8001, name
        hosts += published.values()
    assert sorted(hosts) == sorted(set(hosts)), "two services on one host port"
    assert _published(services["classifier"]) == {8000: 8000, 8001: 8001}


def test_compose_gpu_profile_reserves_an_nvidia_gpu():
    gpu = _compose()["services"]["classifier-gpu"]
    assert gpu["build"]["target"] == "gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert any(v.endswith(":/cache/engines") for v in gpu["volumes"])


# ---------------------------------------------------------------------------------------------
# Dockerfile


def test_hadolint_passes():
    result = _run(_tool("hadolint"), str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def _stages() -> dict[str, list[str]]:
    """Instructions per stage name (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = stages.setdefault("", [])
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(?:--platform=\S+\s+)?\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(1), [])
        current.append(line)
    return stages


def test_dockerfile_stages_and_base_image_argument():
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.MULTILINE), "a syntax line pulls a frontend image"
    stages = _stages()
    assert list(stages)[-1] == "runtime", "runtime must be the last stage: the default target"
    assert {"export", "runtime", "gpu", "jetson", "loadgen"} <= set(stages)
    assert "ARG BASE_IMAGE=python:3.11-slim" in stages[""]
    assert stages["base"][0] == "FROM ${BASE_IMAGE} AS base"


def test_dockerfile_runtime_stage_contract():
    stages = _stages()
    runtime = stages["runtime"]
    # No torch: the runtime's dependencies are installed without any extra, and nothing else is.
    assert not any("--extra" in line or "pip install" in line for line in runtime)
    assert not any("--extra" in line for line in stages["runtime-venv"])
    assert "COPY --from=export /export/model_repository/ /app/model_repository/" in runtime
    (user,) = [line for line in runtime if line.startswith("USER ")]
    uid = user.split()[1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root user (runAsNonRoot can verify it)"
    assert "EXPOSE 8000 8001" in runtime  # HTTP and the Open Inference Protocol over gRPC
    assert "STOPSIGNAL SIGTERM" in runtime
    (healthcheck,) = [line for line in runtime if line.startswith("HEALTHCHECK")]
    exec_form = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert _healthcheck_path(["CMD", *exec_form]) == "/healthz"
    (cmd,) = [line for line in runtime if line.startswith("CMD ")]
    assert json.loads(cmd[4:]) == ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]


@pytest.mark.parametrize("stage", ["gpu", "jetson"])
def test_dockerfile_accelerator_stages_build_engines_at_start(stage):
    lines = _stages()[stage]
    assert lines[0].startswith("FROM ${") and lines[0].endswith(f" AS {stage}")
    assert 'ENTRYPOINT ["/bin/sh", "/app/deploy/entrypoint.sh"]' in lines
    assert any(line.startswith("USER 10001") for line in lines)
    assert any(f"ENGINE_TARGET={stage}" in line for line in lines)
    assert any("HEALTHCHECK" in line and "/healthz" in line for line in lines)


def test_runtime_requirements_have_no_torch():
    pyproject = __import__("tomllib").loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = requirements_script.requirements(pyproject, [], [])
    names = {requirements_script._name(req) for req in runtime}
    assert names.isdisjoint({"torch", "torchvision", "onnx", "onnxscript"})
    gpu = requirements_script.requirements(pyproject, ["gpu"], ["onnxruntime"])
    assert "onnxruntime" not in {requirements_script._name(req) for req in gpu}
    assert "onnxruntime-gpu" in {requirements_script._name(req) for req in gpu}
    assert requirements_script.requirements(pyproject, [], [], ["no-such-extra"]) == runtime
    with pytest.raises(SystemExit):
        requirements_script.requirements(pyproject, ["no-such-extra"], [])


# ---------------------------------------------------------------------------------------------
# Shell scripts


@pytest.mark.parametrize("script", ["deploy/entrypoint.sh", "deploy/install-test-tools.sh"])
def test_shell_scripts_pass_shellcheck(script):
    result = _run(_tool("shellcheck"), script)
    assert result.returncode == 0, result.stdout


def _fake_repository(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "model.onnx").write_bytes(name.encode())
        (root / name / "model.json").write_text("{}")


def _entrypoint(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run the entrypoint with a fake python that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python"
    fake.write_text('#!/bin/sh\necho "$@" >> "$CALLS"\n')
    fake.chmod(0o755)
    full_env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "CALLS": str(tmp_path / "calls"),
        "IMAGE_MODEL_REPOSITORY": str(tmp_path / "image"),
        "MODEL_REPOSITORY": str(tmp_path / "cache"),
        **env,
    }
    return _run("/bin/sh", str(ENTRYPOINT), *args, env=full_env)


def test_entrypoint_seeds_the_cache_builds_engines_then_serves(tmp_path):
    _fake_repository(tmp_path / "image", ["mobilenet_v2", "shufflenet_v2"])
    result = _entrypoint(tmp_path, "serve", ENGINE_TARGET="jetson", ENGINE_BUILD_ARGS="--precision fp16")
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == [
        "/app/build_engines.py --models mobilenet_v2 shufflenet_v2 --target jetson "
        f"--out {tmp_path / 'cache'} --precision fp16",
        "-m service --host 0.0.0.0 --port 8000",
    ]
    assert (tmp_path / "cache" / "shufflenet_v2" / "model.onnx").read_bytes() == b"shufflenet_v2"
    # A second start keeps what the cache holds (engines) while the image's ONNX is unchanged...
    (tmp_path / "cache" / "shufflenet_v2" / "engine.plan").write_text("engine")
    (tmp_path / "image" / "mobilenet_v2" / "model.onnx").write_bytes(b"new export")
    assert _entrypoint(tmp_path, "build-engines", MODELS="shufflenet_v2").returncode == 0
    assert (tmp_path / "cache" / "shufflenet_v2" / "engine.plan").exists()
    # ...and replaces a model whose ONNX changed (a new image).
    assert (tmp_path / "cache" / "mobilenet_v2" / "model.onnx").read_bytes() == b"new export"
    assert (
        (tmp_path / "calls")
        .read_text()
        .splitlines()[-1]
        .startswith("/app/build_engines.py --models shufflenet_v2 --target gpu")
    )


def test_entrypoint_skips_the_build_when_told(tmp_path):
    _fake_repository(tmp_path / "image", ["mobilenet_v1"])
    result = _entrypoint(tmp_path, SKIP_ENGINE_BUILD="1", PORT="9000")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "calls").read_text().splitlines() == ["-m service --host 0.0.0.0 --port 9000"]


def test_entrypoint_fails_when_the_engine_build_fails(tmp_path):
    _fake_repository(tmp_path / "image", ["mobilenet_v1"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text("#!/bin/sh\nexit 3\n")
    (bin_dir / "python").chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "IMAGE_MODEL_REPOSITORY": str(tmp_path / "image"),
        "MODEL_REPOSITORY": str(tmp_path / "cache"),
    }
    result = _run("/bin/sh", str(ENTRYPOINT), "serve", env=env)
    assert result.returncode == 3, "a failed build must not fall through to serving"
