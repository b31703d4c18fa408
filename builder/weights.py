"""Pretrained weights for the build: where they come from, how they are fetched safely, which to use.

* the published checkpoints the build may use (torchvision's and timm's ``mobilenetv1_100``, listed per
  family in :data:`contract.zoo.FAMILIES`);
* a download cache that only ever holds verified files: a download is streamed to a temporary file
  in the cache directory, its SHA-256 checked, and only then renamed into place, so an interrupted or
  tampered download never poisons the cache; a cached file is re-verified before every use;
* :func:`resolve`, which implements ``--weights auto|imagenet|random|PATH`` (checkpoint files are read
  without executing pickled code, then mapped by ``models.adapt_state_dict``), and
  :func:`calibrate_batchnorm`, which makes a random initialisation usable for checking an export.

torch is imported lazily, so that a machine without PyTorch can still import the build step.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from contract import zoo
from contract.manifest import sha256_of
from contract.zoo import PublishedWeights, parse
from models import adapt_state_dict
from models.checkpoints import StateDictMismatch, WeightsError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ChecksumError",
    "NoPublishedWeights",
    "StateDictMismatch",
    "WeightsError",
    "WeightsUnavailable",
    "calibrate_batchnorm",
    "download",
    "load_file",
    "published_weights",
    "resolve",
]

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/efficient-cnn/weights")
CACHE_ENV = "WEIGHTS_CACHE"
# A mirror that keeps the original URL paths (``<base>/models/mobilenet_v2-b0353104.pth``); also how the
# tests serve checkpoints from a local HTTP server.
BASE_URL_ENV = "WEIGHTS_BASE_URL"
DOWNLOAD_TIMEOUT_S = 30.0
WEIGHT_CHOICES = ("auto", "imagenet", "random")
LOCAL_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


class WeightsUnavailable(WeightsError):
    """The checkpoint could not be fetched (network, HTTP error, timeout)."""


class ChecksumError(WeightsError):
    """A downloaded or cached file does not have the SHA-256 it must have."""


class NoPublishedWeights(WeightsError):
    """The model has no published checkpoint that this project can load."""


# ---------------------------------------------------------------------------------------------
# Published checkpoints


def published_weights(
    name: str, published: Mapping[str, PublishedWeights] | None = None
) -> PublishedWeights | None:
    """The published checkpoint of model ``name`` (any spelling), or None."""
    table = zoo.PUBLISHED if published is None else published
    return table.get(parse(name).variant)


def _with_base_url(url: str, base_url: str | None) -> str:
    if not base_url:
        return url
    parts = urlparse(url)
    return base_url.rstrip("/") + parts.path


def _cache_name(url: str) -> str:
    # Derived from the path only, so a mirror fills the same cache entry as the original host.
    path = urlparse(url).path.strip("/")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path) or "checkpoint"


def cache_dir_for(cache_dir: str | os.PathLike | None = None) -> Path:
    """The weights cache: the argument, else ``$WEIGHTS_CACHE``, else ``~/.cache/efficient-cnn/weights``."""
    chosen = cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser()


# ---------------------------------------------------------------------------------------------
# Download and verification


def _digest_matches(actual: str, expected: str) -> bool:
    # torchvision publishes only the first 8-10 hex digits (in the file name); a full digest must match fully.
    expected = expected.lower()
    if len(expected) == 64:
        return actual == expected
    return len(expected) >= 8 and actual.startswith(expected)


def _recorded_digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _expected_digest(path: Path, pinned: str) -> str | None:
    """The digest a cached file must have: the pinned one, else the one recorded at first download."""
    if pinned:
        return pinned
    record = _recorded_digest_path(path)
    if record.is_file():
        return record.read_text(encoding="utf-8").split()[0].strip().lower()
    return None


def _verify_cached(path: Path, pinned: str) -> str | None:
    """The digest of a usable cached file, or None (missing, or failed verification and removed)."""
    if not path.is_file():
        return None
    actual = sha256_of(path)
    expected = _expected_digest(path, pinned)
    if expected is not None and _digest_matches(actual, expected):
        return actual
    log.warning(
        "cached weights %s fail verification (expected sha256 %s, actual %s); removing and downloading again",
        path,
        expected or "<no record>",
        actual,
    )
    path.unlink(missing_ok=True)
    _recorded_digest_path(path).unlink(missing_ok=True)
    return None


def download(
    url: str,
    sha256: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    cache_name: str | None = None,
) -> tuple[Path, str]:
    """Fetch ``url`` into the cache once and return (path, full SHA-256).

    ``sha256`` is a full digest or a prefix (torchvision's file-name convention); empty means "none
    pinned", in which case the digest of the first download is recorded and enforced afterwards.
    """
    directory = cache_dir_for(cache_dir)
    target = directory / (cache_name or _cache_name(url))
    cached = _verify_cached(target, sha256)
    if cached is not None:
        log.info("weights cached: %s", target)
        return target, cached

    directory.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", url)
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as handle, urllib.request.urlopen(url, timeout=timeout) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    handle.write(chunk)
        except urllib.error.HTTPError as exc:
            raise WeightsUnavailable(
                f"cannot download weights from {url}: HTTP {exc.code} {exc.reason}"
            ) from exc
        except urllib.error.URLError as exc:
            raise WeightsUnavailable(f"cannot download weights from {url}: {exc.reason}") from exc
        except (TimeoutError, OSError) as exc:
            raise WeightsUnavailable(f"cannot download weights from {url}: {exc}") from exc
        actual = digest.hexdigest()
        if sha256 and not _digest_matches(actual, sha256):
            raise ChecksumError(
                f"checksum mismatch for {url}: expected sha256 {sha256.lower()}, got {actual}; "
                "the download was discarded"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    if not sha256:
        _recorded_digest_path(target).write_text(f"{actual}  {target.name}\n", encoding="utf-8")
        log.warning("no pinned sha256 for %s; recorded the downloaded file's digest %s", url, actual)
    return target, actual


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint file


def load_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors, never executing pickled code (``weights_only=True``)."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file as load_safetensors
        except ImportError as exc:
            raise WeightsError(
                f"{path} is a .safetensors file but the 'safetensors' package is not installed; "
                "install it or convert the file to a .pth state dict"
            ) from exc
        return dict(load_safetensors(str(path), device="cpu"))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot load {path} as a PyTorch state dict: {exc}") from exc
    if not isinstance(loaded, Mapping):
        raise WeightsError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    return loaded


# ---------------------------------------------------------------------------------------------
# --weights auto|imagenet|random|PATH


def calibrate_batchnorm(
    module: torch.nn.Module, input_shape: tuple[int, ...], seed: int = 0
) -> torch.nn.Module:
    """Give a randomly initialised module's BatchNorm layers the statistics of its own activations.

    With fresh running statistics (mean 0, variance 1) the activations of a deep random network shrink
    layer after layer (MobileNet v1's logits end near 1e-17), which makes a random-weights build useless
    even for checking an export: every runtime "agrees" on zero. Running a few random batches through
    the network in training mode sets the statistics so each layer's output keeps unit scale. The
    weights stay random; the result depends only on ``seed``.
    """
    import torch
    from torch import nn

    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return module.eval()
    generator = torch.Generator().manual_seed(seed)
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the calibration batches
    module.train()
    with torch.no_grad():
        for _ in range(2):
            module(torch.randn(8, *input_shape, generator=generator))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    return module.eval()


def _provenance(source: str, *, url=None, path=None, sha256=None, note: str = "") -> dict[str, Any]:
    # The keys of contract.manifest.WeightsProvenance.
    return {"source": source, "url": url, "path": path, "sha256": sha256, "note": note}


def _loud_warning(message: str) -> None:
    # Logged for log collectors and printed for a human at the terminal: random weights classify nothing.
    log.warning(message)
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _imagenet(
    name: str,
    cache_dir: str | os.PathLike | None,
    published: Mapping[str, PublishedWeights] | None,
    base_url: str | None,
    timeout: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = parse(name)
    weights = published_weights(name, published)
    if weights is None:
        raise NoPublishedWeights(
            f"{spec.variant}: no published ImageNet checkpoint exists in a form this project can load; "
            "pass a local state dict file instead: --weights PATH"
        )
    base = base_url if base_url is not None else os.environ.get(BASE_URL_ENV)
    fetch_url = _with_base_url(weights.url, base)
    path, digest = download(
        fetch_url, weights.sha256, cache_dir, timeout=timeout, cache_name=_cache_name(weights.url)
    )
    state_dict = adapt_state_dict(name, load_file(path))
    notes = [weights.note] if weights.note else []
    if not weights.sha256:
        notes.append("no published sha256; digest recorded at first download")
    if fetch_url != weights.url:
        notes.append(f"fetched from mirror {fetch_url}")
    return state_dict, _provenance("imagenet", url=weights.url, sha256=digest, note="; ".join(notes))


def resolve(
    name: str,
    weights: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    published: Mapping[str, PublishedWeights] | None = None,
    base_url: str | None = None,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The state dict for ``--weights`` (ready for a strict ``load_state_dict``) and its provenance.

    ``random`` gives ``(None, ...)``: keep the module's initialisation. ``imagenet`` downloads (once) or
    raises. ``auto`` tries ``imagenet`` and falls back to random with a loud warning. Anything else is a
    path to a local checkpoint. ``published`` and ``base_url`` replace the published table and host
    (``$WEIGHTS_BASE_URL``), for mirrors and tests.
    """
    if weights == "random":
        return None, _provenance("random", note="random initialisation")
    if weights == "imagenet":
        return _imagenet(name, cache_dir, published, base_url, timeout)
    if weights == "auto":
        try:
            return _imagenet(name, cache_dir, published, base_url, timeout)
        except (NoPublishedWeights, WeightsUnavailable, ChecksumError) as exc:
            variant = parse(name).variant
            _loud_warning(
                f"{variant}: using RANDOM weights, predictions will be meaningless. "
                f"ImageNet weights unavailable: {exc}"
            )
            return None, _provenance(
                "random", note=f"--weights auto fell back to random initialisation: {exc}"
            )

    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"--weights {weights!r}: not one of {', '.join(WEIGHT_CHOICES)} and not an existing file"
        )
    if path.suffix not in LOCAL_SUFFIXES:
        raise WeightsError(f"--weights {weights!r}: expected a {'/'.join(LOCAL_SUFFIXES)} checkpoint file")
    state_dict = adapt_state_dict(name, load_file(path))
    return state_dict, _provenance("file", path=str(path.resolve()), sha256=sha256_of(path))
