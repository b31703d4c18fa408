"""Fuzzing: the decode path (atheris, coverage-guided), the HTTP layer (hypothesis-built requests),
and the API against its own OpenAPI schema (schemathesis): no 5xx, every answer in the documented
shape. tests/test_imaging.py holds the hypothesis properties of the decoder itself.

Counts per run (the acceptance asks for 10,000 through the decode path, 1,000 through the API):
``DECODE_RUNS`` atheris inputs, ``HTTP_EXAMPLES`` hypothesis requests and ``API_EXAMPLES`` per
schemathesis operation (the classify route gets ``CLASSIFY_API_EXAMPLES``).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from contract.photos import encode, make_photo
from service.app import create_app
from tests.conftest import REPO
from tests.fake_repository import make_repository
from tests.live_server import LiveServer, serving, serving_settings, wait_ready

DECODE_RUNS = 30_000
HTTP_EXAMPLES = 400
API_EXAMPLES = 80
CLASSIFY_API_EXAMPLES = 1100

ERROR_CODES = {
    "invalid_image",
    "unknown_model",
    "payload_too_large",
    "image_too_large",
    "unsupported_media_type",
    "invalid_parameter",
    "overloaded",
    "not_found",
    "method_not_allowed",
}

_tiny = make_photo(20, 15, seed=3)
SEEDS = [
    encode(_tiny, "JPEG", quality=80),
    encode(_tiny, "PNG"),
    encode(_tiny, "GIF"),
    encode(_tiny, "WEBP", quality=80),
    encode(_tiny, "BMP"),
    encode(_tiny, "TIFF"),
]
COUNTS: Counter[str] = Counter()


# --- the decode path: atheris ----------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed here")
def test_atheris_finds_no_crash_in_the_decode_path():
    result = subprocess.run(
        [sys.executable, "-m", "tests.fuzz_decode", f"-runs={DECODE_RUNS}", "-max_len=8192", "-seed=7"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    done = re.search(r"Done (\d+) runs", result.stderr)
    assert done and int(done.group(1)) >= DECODE_RUNS, result.stderr[-2000:]
    COUNTS["decode"] += int(done.group(1))


# --- the HTTP layer: hypothesis ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = make_repository(tmp_path_factory.mktemp("fuzz") / "model_repository")
    app = create_app(serving_settings(root, max_queue_size=16, max_body_bytes=256 * 1024))
    with serving(app) as client:
        assert client.get("/readyz").status_code == 200
        yield client


@st.composite
def image_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["seed", "mutated", "random", "empty"]))
    if kind == "random":
        return draw(st.binary(max_size=2048))
    if kind == "empty":
        return b""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 6))):
            position = draw(st.integers(0, max(0, len(data) - 1)))
            data[position : position + draw(st.integers(0, 8))] = draw(st.binary(max_size=8))
    return bytes(data)


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
CONTENT_TYPES = st.one_of(
    st.sampled_from(
        ["image/jpeg", "image/png", "application/octet-stream", "text/plain", "image/svg+xml", "", "image/*"]
    ),
    TEXT.map(lambda t: "image/" + t),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
)


@st.composite
def multipart_body(draw: st.DrawFn) -> tuple[bytes, str]:
    boundary = draw(
        st.text(
            st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=";,\"'"),
            min_size=1,
            max_size=80,
        )
    )
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from([b"file", b"image", b"", b"file\x00", "fïle".encode()]))
        filename = draw(st.one_of(st.none(), st.binary(max_size=30)))
        head = b'Content-Disposition: form-data; name="' + name + b'"'
        if filename is not None:
            head += (
                b'; filename="' + filename.replace(b'"', b"").replace(b"\r", b"").replace(b"\n", b"") + b'"'
            )
        if draw(st.booleans()):
            head += b"\r\nContent-Type: " + draw(CONTENT_TYPES).encode("utf-8", "replace").replace(
                b"\r", b""
            ).replace(b"\n", b"")
        parts.append(b"--" + boundary.encode() + b"\r\n" + head + b"\r\n\r\n" + draw(image_bytes()) + b"\r\n")
    body = b"".join(parts)
    if draw(st.booleans()):
        body += b"--" + boundary.encode() + b"--\r\n"
    declared = draw(st.sampled_from([boundary, boundary + "x", ""]))
    return body, f"multipart/form-data; boundary={declared}" if declared else "multipart/form-data"


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, dict[str, bytes]]:
    model = draw(st.one_of(st.sampled_from(["mobilenet_v2", "shufflenet_v2", "resnet50", ""]), TEXT))
    query = {"model": model}
    if draw(st.booleans()):
        query["top_k"] = draw(st.one_of(st.integers(-5, 1100).map(str), TEXT))
    if draw(st.booleans()):
        body, content_type = draw(multipart_body())
    else:
        body, content_type = draw(image_bytes()), draw(CONTENT_TYPES)
    # Header values go as raw bytes (UTF-8 included): what a careless client puts on the wire.
    return json.dumps(query), body, {"Content-Type": content_type.encode("utf-8")}


@settings(max_examples=HTTP_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(requests())
def test_hypothesis_requests_get_no_5xx_and_the_error_shape(client, request):
    query, body, headers = request
    response = client.post("/classify", params=json.loads(query), content=body, headers=headers)
    COUNTS["http"] += 1
    assert response.status_code < 500, (request, response.text)
    payload = response.json()
    if response.status_code == 200:
        assert "predictions" in payload or "results" in payload
    else:
        assert set(payload) == {"error"} and payload["error"]["code"] in ERROR_CODES, payload
        assert len(payload["error"]["message"]) <= 400


# --- the API against its own OpenAPI schema: schemathesis ---------------------------------------------
for _media_type in ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif", "image/tiff"):
    schemathesis.openapi.media_type(_media_type, image_bytes())
schemathesis.openapi.media_type("application/octet-stream", image_bytes())


@pytest.fixture(scope="module")
def api_url(tmp_path_factory):
    root = make_repository(tmp_path_factory.mktemp("fuzz-api") / "model_repository")
    app = create_app(serving_settings(root, max_queue_size=16, max_body_bytes=256 * 1024))
    with LiveServer(app) as server:
        wait_ready(server.url)
        yield server.url


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_documented_route_answers_as_documented(api_url, mode):
    """Schemathesis's checks on each case: no 5xx, a documented status, content type, headers and body."""
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {"POST /classify", "GET /models/{name}"}
    for operation in operations:
        examples = CLASSIFY_API_EXAMPLES if operation.path == "/classify" else API_EXAMPLES
        _run_cases(operation, mode, examples // 2, api_url)


def _run_cases(operation, mode: GenerationMode, examples: int, base_url: str) -> None:
    name = f"api {operation.method.upper()} {operation.path}"

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(operation.as_strategy(generation_mode=mode))
    def call_and_validate(case):
        COUNTS["api"] += 1
        COUNTS[name] += 1
        case.call_and_validate(base_url=base_url)

    try:
        call_and_validate()
    except Unsatisfiable:
        # Negative mode where nothing can be invalid: no parameters or body, or one free-form string.
        assert mode is GenerationMode.NEGATIVE and operation.path != "/classify", name


def test_zzz_counts(capsys):
    """How many generated cases ran in this session (printed for the record)."""
    with capsys.disabled():
        print("\nfuzz cases:", json.dumps(dict(COUNTS)))
    if COUNTS["api"]:
        assert COUNTS["api"] >= 1000, COUNTS
