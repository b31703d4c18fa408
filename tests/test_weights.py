"""Weights: the download cache against a local HTTP server, --weights resolution, state-dict adaptation."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from builder import weights
from contract import zoo
from contract.manifest import WeightsProvenance
from contract.zoo import PublishedWeights

REPO = Path(__file__).resolve().parents[1]
STAND_IN = "shufflenet_v2_0.5x"  # a name with published weights; the network is replaced by _TinyNet
REFERENCE_DIR = Path(os.environ.get("REFERENCE_DIR", REPO.parent / "shared" / "reference"))
_BN_LEAVES = ("weight", "bias", "running_mean", "running_var")


def _timm_mobilenetv1_100_layout() -> list[tuple[str, list[int], str]]:
    """timm's ``mobilenetv1_100`` state-dict layout, written out so the test runs without the reference
    files; checked against ``timm_mobilenetv1_100.json`` wherever that file is present."""

    def bn(prefix: str, channels: int) -> list[tuple[str, list[int], str]]:
        tensors = [(f"{prefix}.{leaf}", [channels], "float32") for leaf in _BN_LEAVES]
        return [*tensors, (f"{prefix}.num_batches_tracked", [], "int64")]

    layout = [("conv_stem.weight", [32, 3, 3, 3], "float32"), *bn("bn1", 32)]
    channels = 32
    for stage, (out, blocks) in enumerate([(64, 1), (128, 2), (256, 2), (512, 6), (1024, 2)]):
        for block in range(blocks):
            prefix = f"blocks.{stage}.{block}"
            layout += [
                (f"{prefix}.conv_dw.weight", [channels, 1, 3, 3], "float32"),
                *bn(f"{prefix}.bn1", channels),
            ]
            layout += [
                (f"{prefix}.conv_pw.weight", [out, channels, 1, 1], "float32"),
                *bn(f"{prefix}.bn2", out),
            ]
            channels = out
    return [*layout, ("classifier.weight", [1000, 1024], "float32"), ("classifier.bias", [1000], "float32")]


def _reference_layout(filename: str) -> list[tuple[str, list[int], str]] | None:
    path = REFERENCE_DIR / filename
    if not path.is_file():
        return None
    return [tuple(entry) for entry in json.loads(path.read_text())["state_dict"]]


def _random_state_dict(layout: list[tuple[str, list[int], str]]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    out = {}
    for key, shape, dtype in layout:
        if dtype == "int64":
            out[key] = torch.randint(0, 100, shape, dtype=torch.int64, generator=generator)
        else:
            out[key] = torch.randn(shape, generator=generator, dtype=getattr(torch, dtype))
    return out


def _timm_state_dict() -> dict[str, torch.Tensor]:
    return _random_state_dict(_timm_mobilenetv1_100_layout())


def _torchvision_mobilenet_v2_state_dict() -> dict[str, torch.Tensor]:
    # Our MobileNet v2 has torchvision's layout exactly (pinned in test_architectures.py).
    layout = _reference_layout("tv_mobilenet_v2.json")
    if layout is None:
        own = models.create("mobilenet_v2").state_dict()
        layout = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in own.items()]
    return _random_state_dict(layout)


# ---------------------------------------------------------------------------------------------
# A local HTTP server that counts its requests


class _Server:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/models/unreachable-00000000.pth"


class _TinyNet(nn.Module):
    def __init__(self, **_: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)


@pytest.fixture
def tiny_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Download tests exercise the cache, not an architecture: stand a tiny module in for the network."""
    monkeypatch.setattr(models, "create", lambda name, num_classes=1000: _TinyNet().eval())


@pytest.fixture
def checkpoint() -> tuple[bytes, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    state_dict = _TinyNet().state_dict()
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue(), state_dict


def _published(url: str, sha256: str) -> dict[str, PublishedWeights]:
    return {zoo.parse(STAND_IN).variant: PublishedWeights(url, sha256, "torchvision")}


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# ---------------------------------------------------------------------------------------------
# Download, verification, cache


@pytest.mark.usefixtures("tiny_network")
def test_download_with_prefix_digest_loads_and_caches(server, checkpoint, tmp_path):
    body, expected = checkpoint
    digest = hashlib.sha256(body).hexdigest()
    server.files[f"/models/tiny-{digest[:10]}.pth"] = body
    published = _published(f"{server.url}/models/tiny-{digest[:10]}.pth", digest[:10])

    state_dict, provenance = weights.resolve(STAND_IN, "imagenet", tmp_path, published=published)
    assert set(state_dict) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(state_dict[key], tensor), key
    assert provenance["source"] == "imagenet"
    assert provenance["sha256"] == digest
    assert provenance["url"] == published[zoo.parse(STAND_IN).variant].url
    WeightsProvenance(**provenance)
    assert len(server.requests) == 1

    again, _ = weights.resolve(STAND_IN, "imagenet", tmp_path, published=published)
    assert len(server.requests) == 1, "a cached checkpoint must not be downloaded again"
    assert torch.equal(again["fc.weight"], expected["fc.weight"])
    assert _files(tmp_path) == [f"models_tiny-{digest[:10]}.pth"]


@pytest.mark.usefixtures("tiny_network")
def test_full_digest_must_match_fully(server, checkpoint, tmp_path):
    body, _ = checkpoint
    digest = hashlib.sha256(body).hexdigest()
    server.files["/tiny.pth"] = body
    _, provenance = weights.resolve(
        STAND_IN, "imagenet", tmp_path, published=_published(server.url + "/tiny.pth", digest)
    )
    assert provenance["sha256"] == digest

    wrong = digest[:63] + ("0" if digest[63] != "0" else "1")
    with pytest.raises(weights.ChecksumError):
        weights.resolve(
            STAND_IN, "imagenet", tmp_path / "other", published=_published(server.url + "/tiny.pth", wrong)
        )


@pytest.mark.usefixtures("tiny_network")
def test_corrupted_download_raises_and_leaves_no_cache(server, checkpoint, tmp_path):
    body, _ = checkpoint
    digest = hashlib.sha256(body).hexdigest()
    corrupted = bytearray(body)
    corrupted[len(corrupted) // 2] ^= 0xFF
    server.files["/models/tiny.pth"] = bytes(corrupted)
    cache = tmp_path / "cache"

    with pytest.raises(weights.ChecksumError) as excinfo:
        weights.resolve(
            STAND_IN, "imagenet", cache, published=_published(server.url + "/models/tiny.pth", digest[:10])
        )
    message = str(excinfo.value)
    assert digest[:10] in message
    assert hashlib.sha256(bytes(corrupted)).hexdigest() in message
    assert _files(cache) == [], "a failed download must leave nothing in the cache"


@pytest.mark.usefixtures("tiny_network")
def test_tampered_cache_is_detected_and_replaced(server, checkpoint, tmp_path):
    body, _ = checkpoint
    digest = hashlib.sha256(body).hexdigest()
    server.files["/tiny.pth"] = body
    published = _published(server.url + "/tiny.pth", digest[:10])
    weights.resolve(STAND_IN, "imagenet", tmp_path, published=published)
    (cached,) = tmp_path.iterdir()
    cached.write_bytes(b"not a checkpoint")

    _, provenance = weights.resolve(STAND_IN, "imagenet", tmp_path, published=published)
    assert len(server.requests) == 2
    assert provenance["sha256"] == digest
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == digest


@pytest.mark.usefixtures("tiny_network")
def test_unpinned_digest_is_recorded_on_first_download_and_enforced(server, checkpoint, tmp_path):
    body, _ = checkpoint
    digest = hashlib.sha256(body).hexdigest()
    server.files["/repo/resolve/abc/pytorch_model.bin"] = body
    published = _published(server.url + "/repo/resolve/abc/pytorch_model.bin", "")

    _, provenance = weights.resolve(STAND_IN, "imagenet", tmp_path, published=published)
    assert provenance["sha256"] == digest
    assert "recorded" in provenance["note"]
    record = tmp_path / "repo_resolve_abc_pytorch_model.bin.sha256"
    assert record.read_text().split()[0] == digest

    # A cached file that no longer has the recorded digest is discarded, not trusted.
    (tmp_path / "repo_resolve_abc_pytorch_model.bin").write_bytes(b"tampered")
    _, provenance = weights.resolve(STAND_IN, "imagenet", tmp_path, published=published)
    assert provenance["sha256"] == digest
    assert len(server.requests) == 2


@pytest.mark.usefixtures("tiny_network")
def test_unreachable_url_gives_a_clear_error(closed_port_url, tmp_path):
    with pytest.raises(weights.WeightsUnavailable) as excinfo:
        weights.resolve(
            STAND_IN, "imagenet", tmp_path, published=_published(closed_port_url, "00000000"), timeout=5
        )
    assert closed_port_url in str(excinfo.value)
    assert _files(tmp_path) == []


@pytest.mark.usefixtures("tiny_network")
def test_http_error_gives_a_clear_error(server, tmp_path):
    url = server.url + "/missing.pth"
    with pytest.raises(weights.WeightsUnavailable, match="404"):
        weights.resolve(STAND_IN, "imagenet", tmp_path, published=_published(url, "00000000"))


@pytest.mark.usefixtures("tiny_network")
def test_auto_falls_back_to_random_loudly(closed_port_url, tmp_path, caplog, capsys):
    with caplog.at_level(logging.WARNING, logger="builder.weights"):
        state_dict, provenance = weights.resolve(
            STAND_IN, "auto", tmp_path, published=_published(closed_port_url, "00000000"), timeout=5
        )
    assert state_dict is None
    assert provenance["source"] == "random"
    assert closed_port_url in provenance["note"]
    WeightsProvenance(**provenance)
    assert any(r.levelno == logging.WARNING and "RANDOM" in r.getMessage() for r in caplog.records)
    assert "RANDOM" in capsys.readouterr().err


@pytest.mark.usefixtures("tiny_network")
def test_auto_uses_imagenet_when_available(server, checkpoint, tmp_path):
    body, _ = checkpoint
    digest = hashlib.sha256(body).hexdigest()
    server.files["/tiny.pth"] = body
    state_dict, provenance = weights.resolve(
        STAND_IN, "auto", tmp_path, published=_published(server.url + "/tiny.pth", digest[:8])
    )
    assert state_dict is not None
    assert provenance["source"] == "imagenet"


@pytest.mark.usefixtures("tiny_network")
def test_base_url_env_points_downloads_at_a_mirror(server, checkpoint, tmp_path, monkeypatch):
    body, _ = checkpoint
    digest = hashlib.sha256(body).hexdigest()
    server.files["/models/tiny.pth"] = body
    monkeypatch.setenv(weights.BASE_URL_ENV, server.url)
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "env-cache"))
    published = _published("https://weights.invalid/models/tiny.pth", digest[:10])

    _, provenance = weights.resolve(STAND_IN, "imagenet", published=published)
    assert server.requests == ["/models/tiny.pth"]
    assert provenance["url"] == "https://weights.invalid/models/tiny.pth"
    assert "mirror" in provenance["note"]
    assert _files(tmp_path / "env-cache") == ["models_tiny.pth"]


def test_no_published_weights_for_shufflenet_v1(tmp_path, caplog, capsys):
    with pytest.raises(weights.NoPublishedWeights, match=r"--weights PATH"):
        weights.resolve("shufflenet_v1", "imagenet", tmp_path)
    state_dict, provenance = weights.resolve("shufflenet_v1_g8_0.5x", "auto", tmp_path)
    assert state_dict is None
    assert provenance["source"] == "random"
    assert "RANDOM" in capsys.readouterr().err


def test_random_and_bad_choices(tmp_path):
    random = {"source": "random", "url": None, "path": None, "sha256": None, "note": "random initialisation"}
    assert weights.resolve("mobilenet_v2", "random") == (None, random)
    with pytest.raises(weights.WeightsError, match="not an existing file"):
        weights.resolve("mobilenet_v2", str(tmp_path / "nope.pth"))


@pytest.mark.usefixtures("tiny_network")
def test_local_file_unwraps_and_records_provenance(checkpoint, tmp_path):
    _, expected = checkpoint
    path = tmp_path / "trained.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in expected.items()}}, path)
    state_dict, provenance = weights.resolve(STAND_IN, str(path))
    assert list(state_dict) == list(expected)
    assert provenance == {
        "source": "file",
        "url": None,
        "path": str(path.resolve()),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "note": "",
    }


def test_checkpoint_files_load_without_running_pickled_code(tmp_path):
    # torchvision's 2018 checkpoints use the pre-zip serialization; both formats must load.
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(weights.load_file(legacy)["w"], torch.ones(2))

    hostile = tmp_path / "hostile.pth"
    torch.save({"w": torch.ones(2), "hook": _TinyNet}, hostile)
    with pytest.raises(weights.WeightsError, match="cannot load"):
        weights.load_file(hostile)


def test_published_table():
    for res in zoo.MOBILENET_V1_RESOLUTIONS:
        assert zoo.parse(f"mobilenet_v1_1.0_{res}").weights is zoo.TIMM_MOBILENET_V1_100
    assert zoo.parse("mobilenet_v1_0.5_224").weights is None
    assert zoo.parse("shufflenet_v2").weights.layout == "torchvision"
    assert zoo.parse("shufflenet_v1").weights is None


# ---------------------------------------------------------------------------------------------
# State-dict adaptation against the real architectures


def test_written_out_timm_layout_matches_the_reference():
    reference = _reference_layout("timm_mobilenetv1_100.json")
    if reference is None:
        pytest.skip(f"{REFERENCE_DIR} is absent")
    assert _timm_mobilenetv1_100_layout() == reference


def test_timm_mobilenet_v1_loads_strictly_after_adaptation():
    timm = _timm_state_dict()
    module = models.create("mobilenet_v1")
    adapted = models.adapt_state_dict("mobilenet_v1", timm)
    module.load_state_dict(adapted, strict=True)

    ours = module.state_dict()
    assert torch.equal(ours[next(iter(ours))], timm["conv_stem.weight"])
    float_keys = [k for k in ours if ours[k].is_floating_point()]
    assert torch.equal(ours[float_keys[-2]], timm["classifier.weight"])
    assert torch.equal(ours[float_keys[-1]], timm["classifier.bias"])
    # Every tensor is used exactly once.
    assert sorted(v.data_ptr() for v in adapted.values()) == sorted(v.data_ptr() for v in timm.values())


def test_timm_mapping_ignores_checkpoint_order_and_any_resolution():
    timm = _timm_state_dict()
    shuffled = dict(reversed(list(timm.items())))
    a = models.adapt_state_dict("mobilenet_v1_1.0_128", shuffled)
    b = models.adapt_state_dict("mobilenet_v1", timm)
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_timm_mapping_reports_the_offending_key():
    timm = _timm_state_dict()
    bad = dict(timm)
    bad["blocks.2.1.conv_pw.weight"] = torch.zeros(7, 7, 1, 1)
    with pytest.raises(weights.StateDictMismatch, match=r"blocks\.2\.1\.conv_pw\.weight"):
        models.adapt_state_dict("mobilenet_v1", bad)
    short = dict(timm)
    del short["classifier.bias"]
    with pytest.raises(weights.StateDictMismatch):
        models.adapt_state_dict("mobilenet_v1", short)
    stray = dict(timm)
    stray["conv_head.weight"] = torch.zeros(1)
    with pytest.raises(weights.StateDictMismatch, match=r"conv_head\.weight"):
        models.adapt_state_dict("mobilenet_v1", stray)


def test_timm_mapping_accepts_checkpoints_without_batch_counters():
    reference = _timm_state_dict()
    timm = {k: v for k, v in reference.items() if not k.endswith("num_batches_tracked")}
    models.create("mobilenet_v1").load_state_dict(models.adapt_state_dict("mobilenet_v1", timm), strict=True)


def test_our_own_mobilenet_v1_layout_passes_through():
    own = models.create("mobilenet_v1_0.5_160").state_dict()
    adapted = models.adapt_state_dict("mobilenet_v1_0.5_160", own)
    assert list(adapted) == list(own)
    assert all(adapted[k] is own[k] for k in own)


def test_torchvision_mobilenet_v2_passes_through_unchanged():
    tv = _torchvision_mobilenet_v2_state_dict()
    adapted = models.adapt_state_dict("mobilenet_v2", tv)
    assert list(adapted) == list(tv)
    assert all(adapted[k] is tv[k] for k in tv)
    models.create("mobilenet_v2").load_state_dict(adapted, strict=True)


def test_torchvision_layout_mismatch_is_named():
    tv = _torchvision_mobilenet_v2_state_dict()
    tv["features.18.0.weight"] = torch.zeros(3, 3, 1, 1)
    with pytest.raises(weights.StateDictMismatch, match=r"features\.18\.0\.weight"):
        models.adapt_state_dict("mobilenet_v2", tv)
