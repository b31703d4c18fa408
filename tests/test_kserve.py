"""KServe: k8s/kserve/ runs the classifier as a custom runtime (a ServingRuntime and an InferenceService).

The manifests are built with ``kubectl kustomize`` as they would be applied. KServe's own kinds are
checked against the fields KServe's CRDs define (serving.kserve.io ServingRuntime v1alpha1 and
InferenceService v1beta1), and everything KServe passes through to Kubernetes (the runtime's
containers and volumes, the predictor's pod fields) is put into a Pod and validated strictly against
Kubernetes' own schema, so a misspelt field fails either way. On top: the contracts between them (the
predictor's format, runtime and protocol are the runtime's) and with the app (the ports it listens
on, the probes' routes, the drain before SIGKILL, the same autoscaling as the plain Deployment).
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import pytest

from tests.test_deploy import K8S, KUBERNETES_VERSION, _app_serves, _kustomize

KSERVE = K8S / "kserve"

# The fields of a ServingRuntime's spec that are KServe's own (serving.kserve.io_servingruntimes.yaml);
# its other fields are a PodSpec's.
SERVING_RUNTIME_FIELDS = frozenset(
    {
        "annotations",
        "builtInAdapter",
        "disabled",
        "grpcDataEndpoint",
        "grpcEndpoint",
        "httpDataEndpoint",
        "labels",
        "multiModel",
        "protocolVersions",
        "replicas",
        "storageHelper",
        "supportedModelFormats",
        "workerSpec",
    }
)
SERVING_RUNTIME_POD_FIELDS = frozenset(
    {
        "affinity",
        "containers",
        "hostIPC",
        "imagePullSecrets",
        "nodeSelector",
        "resourceClaims",
        "schedulerName",
        "tolerations",
        "volumes",
    }
)
SUPPORTED_MODEL_FORMAT_FIELDS = frozenset({"name", "version", "autoSelect", "priority"})
# KServe's protocol versions (its InferenceServiceProtocol values).
PROTOCOL_VERSIONS = frozenset({"v1", "v2", "grpc-v1", "grpc-v2"})
# An InferenceService predictor's own fields (serving.kserve.io_inferenceservices.yaml); the rest are
# a PodSpec's.
PREDICTOR_FIELDS = frozenset(
    {
        "annotations",
        "autoScaling",
        "batcher",
        "canaryTrafficPercent",
        "containerConcurrency",
        "deploymentStrategy",
        "labels",
        "logger",
        "maxReplicas",
        "minReplicas",
        "model",
        "name",
        "scaleMetric",
        "scaleMetricType",
        "scaleTarget",
        "storageContainerName",
        "storageUris",
        "timeout",
        "workerSpec",
        *("huggingface", "lightgbm", "onnx", "paddle", "pmml", "pytorch", "sklearn", "tensorflow"),
        *("triton", "xgboost"),
    }
)
# A predictor model's own fields; the rest are a Container's, merged into the runtime's container.
MODEL_FIELDS = frozenset(
    {"modelFormat", "protocolVersion", "runtime", "runtimeVersion", "storage", "storageUri"}
)
# KServe merges the predictor into the runtime's container of this name.
KSERVE_CONTAINER = "kserve-container"
# KServe gives a Service port appProtocol kubernetes.io/h2c when its name holds one of these.
GRPC_PORT_NAME = re.compile("grpc|h2c")


@functools.cache
def _built() -> tuple[dict[str, Any], ...]:
    return tuple(_kustomize(KSERVE))


def _docs() -> list[dict[str, Any]]:
    return copy.deepcopy(list(_built()))


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _runtime_container(runtime: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in runtime["spec"]["containers"] if c["name"] == KSERVE_CONTAINER]
    return container


def _pod(runtime: dict[str, Any], isvc: dict[str, Any]) -> dict[str, Any]:
    """The pod KServe would make: the runtime's pod fields and containers, the predictor's pod fields,
    and the predictor model's container fields merged into the runtime's container."""
    spec = {k: v for k, v in runtime["spec"].items() if k not in SERVING_RUNTIME_FIELDS}
    predictor = isvc["spec"]["predictor"]
    spec |= {k: v for k, v in predictor.items() if k not in PREDICTOR_FIELDS}
    container = _runtime_container({"spec": spec})
    container |= {k: v for k, v in predictor["model"].items() if k not in MODEL_FIELDS}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "classifier-predictor"}, "spec": spec}


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {var["name"]: var["value"] for var in container.get("env", [])}


def _settings(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch):
    """The server's settings as the container starts it: its environment, then its command line."""
    from service.config import Settings

    for name in ("PORT", "HOST", "GRPC_PORT", "METRICS_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in _env(container).items():
        monkeypatch.setenv(name, value)
    args = container["args"]
    return Settings(host=args[args.index("--host") + 1], port=int(args[args.index("--port") + 1]))


def _validate_pod(pod: dict[str, Any]) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{exc.message} at {list(exc.path)}")


# ---------------------------------------------------------------------------------------------


def test_kustomize_builds_the_runtime_and_the_inference_service():
    docs = _docs()
    assert sorted((doc["apiVersion"], doc["kind"]) for doc in docs) == [
        ("serving.kserve.io/v1alpha1", "ServingRuntime"),
        ("serving.kserve.io/v1beta1", "InferenceService"),
    ]
    # The overlay's image tag reaches the runtime's container (kustomize's image transformer).
    container = _runtime_container(_one(docs, "ServingRuntime"))
    assert container["image"] == "efficient-cnn-classifier:0.1.0"


def test_only_fields_kserve_defines():
    docs = _docs()
    runtime, isvc = _one(docs, "ServingRuntime"), _one(docs, "InferenceService")
    assert runtime["spec"].keys() <= SERVING_RUNTIME_FIELDS | SERVING_RUNTIME_POD_FIELDS
    for model_format in runtime["spec"]["supportedModelFormats"]:
        assert model_format.keys() <= SUPPORTED_MODEL_FORMAT_FIELDS
        assert isinstance(model_format["version"], str)
    assert set(runtime["spec"]["protocolVersions"]) <= PROTOCOL_VERSIONS
    assert isvc["spec"].keys() <= {"predictor", "transformer", "explainer", "canary"}
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"].keys() <= {"name", "version"}
    # Everything else is Kubernetes': the pod KServe makes passes strict validation.
    _validate_pod(_pod(runtime, isvc))


def test_validation_catches_a_misspelt_field():
    import kubernetes_validate

    docs = _docs()
    runtime, isvc = _one(docs, "ServingRuntime"), _one(docs, "InferenceService")
    runtime["spec"]["protocolVersion"] = ["v2"]  # KServe's field is protocolVersions
    assert not runtime["spec"].keys() <= SERVING_RUNTIME_FIELDS | SERVING_RUNTIME_POD_FIELDS
    del runtime["spec"]["protocolVersion"]
    _runtime_container(runtime)["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(_pod(runtime, isvc), KUBERNETES_VERSION, strict=True)


def test_the_runtime_serves_the_open_inference_protocol_over_http_and_grpc(monkeypatch):
    runtime = _one(_docs(), "ServingRuntime")
    assert {"v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    assert runtime["spec"].get("multiModel", False) is False
    container = _runtime_container(runtime)
    settings = _settings(container, monkeypatch)
    ports = {port["name"]: port for port in container["ports"]}
    # KServe's Service sends its port 80 to the first port: the HTTP one, where the server listens.
    assert container["ports"][0]["name"] == "http"
    assert ports["http"]["containerPort"] == settings.port == 8000
    # gRPC on the port the server opens (GRPC_PORT), named so that KServe marks it h2c.
    grpc = [port for port in container["ports"] if GRPC_PORT_NAME.search(port["name"])]
    assert [port["containerPort"] for port in grpc] == [settings.grpc_port] == [8001]
    assert all(port.get("protocol", "TCP") == "TCP" for port in container["ports"])
    # The image's models: nothing to download, no storage initializer.
    assert "storageUri" not in _one(_docs(), "InferenceService")["spec"]["predictor"]["model"]


def test_runtime_probes_hit_app_routes_on_the_http_port():
    container = _runtime_container(_one(_docs(), "ServingRuntime"))
    http = {port["name"]: port["containerPort"] for port in container["ports"]}
    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe_name, path in expected.items():
        probe = container[probe_name]["httpGet"]
        assert probe["path"] == path and _app_serves(path), probe_name
        assert http.get(probe["port"], probe["port"]) == 8000, probe_name
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180


def test_the_predictor_uses_the_runtime():
    docs = _docs()
    runtime, isvc = _one(docs, "ServingRuntime"), _one(docs, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]


def test_the_inference_service_autoscales_like_the_deployment_and_serves_both_ports():
    isvc = _one(_docs(), "InferenceService")
    annotations = isvc["metadata"]["annotations"]
    # The raw Deployment mode (Knative's would expose one port only), with KServe's HPA.
    assert annotations["serving.kserve.io/deploymentMode"] in {"RawDeployment", "Standard"}
    assert annotations["serving.kserve.io/autoscalerClass"] == "hpa"
    predictor = isvc["spec"]["predictor"]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert predictor["scaleMetric"] in {"cpu", "memory"} and 0 < predictor["scaleTarget"] <= 100
    hpa = _kustomize(K8S / "overlays" / "cpu")
    (base,) = [doc for doc in hpa if doc["kind"] == "HorizontalPodAutoscaler"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (
        base["spec"]["minReplicas"],
        base["spec"]["maxReplicas"],
    )
    (cpu,) = base["spec"]["metrics"]
    assert predictor["scaleTarget"] == cpu["resource"]["target"]["averageUtilization"]


def test_sigkill_comes_after_the_prestop_sleep_and_the_drain():
    docs = _docs()
    runtime, isvc = _one(docs, "ServingRuntime"), _one(docs, "InferenceService")
    container = _runtime_container(runtime)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(_env(container)["SHUTDOWN_GRACE_S"])
    assert isvc["spec"]["predictor"]["terminationGracePeriodSeconds"] > pre_stop + drain


def test_the_runtime_runs_as_non_root_on_a_read_only_root():
    docs = _docs()
    pod = _pod(_one(docs, "ServingRuntime"), _one(docs, "InferenceService"))["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for container in pod["containers"]:
        security = {**pod["securityContext"], **container["securityContext"]}
        assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert "ALL" in security["capabilities"]["drop"]
        assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
        (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert "emptyDir" in volumes[tmp["name"]]
