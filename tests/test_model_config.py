"""MODEL_CONFIG (service/model_config.py): per-model settings read from a TOML file, each error naming
the file, the table and the key; the settings in force per model (Settings.for_model), the environment
over the file over the defaults; and a served model showing them in /models."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.tune import TUNED_VARIABLES
from builder import precision
from contract.manifest import Manifest
from contract.photos import photo_jpeg
from service.app import create_app
from service.config import CPU_BATCHING, GPU_BATCHING, BatchingPolicy, ConfigError, Settings, load_settings
from service.core.cpus import cpu_count
from service.model_config import ModelSection, read_model_config, render_model_config
from tests.fake_repository import make_repository
from tests.live_server import serving, serving_settings

TUNED = """\
# a comment
[mobilenet_v2]
precision = "int8"
max_batch_size = 4
max_queue_delay_ms = 2        # an integer where a float is expected is fine
max_concurrent_batches = 2
intra_op_threads = 2
inter_op_threads = 1
execution_mode = "parallel"

["shufflenet_v2:fp16"]
max_concurrent_batches = 1
"""

# Variables Settings reads that these tests set (the ones the tune sets too): cleared so the
# developer's shell cannot leak in.
_VARIABLES = TUNED_VARIABLES


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for variable in _VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "model_config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_file_is_read_into_one_table_per_served_name(tmp_path):
    sections = read_model_config(_write(tmp_path, TUNED))
    assert list(sections) == ["mobilenet_v2", "shufflenet_v2:fp16"]
    assert sections["mobilenet_v2"] == ModelSection(
        precision="int8",
        max_batch_size=4,
        max_queue_delay_ms=2.0,
        max_concurrent_batches=2,
        intra_op_threads=2,
        inter_op_threads=1,
        execution_mode="parallel",
    )
    assert sections["shufflenet_v2:fp16"].given() == {"max_concurrent_batches": 1}
    assert read_model_config(_write(tmp_path, "")) == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[mobilenet_v2]\nmax_batch_size = 0\n",
            r"\[mobilenet_v2\] max_batch_size: .*greater than or equal",
        ),
        ("[mobilenet_v2]\nmax_batch_size = 1000\n", r"\[mobilenet_v2\] max_batch_size: .*less than or equal"),
        ("[mobilenet_v2]\nmax_batch_size = '4'\n", r"\[mobilenet_v2\] max_batch_size: .*valid integer.*'4'"),
        ("[mobilenet_v2]\nmax_batch_size = 2.5\n", r"\[mobilenet_v2\] max_batch_size: .*2\.5"),
        ("[mobilenet_v2]\nintra_op_threads = true\n", r"\[mobilenet_v2\] intra_op_threads: .*True"),
        ("[mobilenet_v2]\nmax_queue_delay_ms = -1\n", r"\[mobilenet_v2\] max_queue_delay_ms: "),
        ("[mobilenet_v2]\nexecution_mode = 'fast'\n", r"\[mobilenet_v2\] execution_mode: .*'fast'"),
        ("[mobilenet_v2]\nprecision = 'int4'\n", r"\[mobilenet_v2\] precision: .*'int4'"),
        (
            "[mobilenet_v2]\nmax_batch = 4\n",
            r"\[mobilenet_v2\] max_batch: unknown key; the keys are max_b",
        ),
        ("[mobilenet_v2.batching]\nmax_batch_size = 4\n", r"\[mobilenet_v2\] batching: unknown key"),
        ("[mobilenet_v9]\nmax_batch_size = 4\n", r"\[mobilenet_v9\]: not a model name"),
        ('["mobilenet_v2:int4"]\nmax_batch_size = 4\n', r"\[mobilenet_v2:int4\]: not a model name"),
        (
            '["mobilenet_v2:int8"]\nprecision = "fp16"\n',
            r"\[mobilenet_v2:int8\] precision: 'fp16' contradicts the table's name.*\[mobilenet_v2\]",
        ),
        ("max_batch_size = 4\n", r"top-level key 'max_batch_size': every setting belongs in a model's table"),
        ("[mobilenet_v2\nmax_batch_size = 4\n", r"not valid TOML: .*line 1"),
    ],
)
def test_each_error_names_the_file_the_table_and_the_key(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=expected) as raised:
        read_model_config(path)
    assert str(raised.value).startswith(f"{path}: ")
    # Through the environment: the server's start-up error names the variable, then the same.
    with pytest.raises(ConfigError, match=f"MODEL_CONFIG: {re.escape(str(path))}: {expected}") as raised:
        load_settings(model_config=str(path))
    assert str(path) in str(raised.value) and "Value error" not in str(raised.value)


def test_a_missing_or_binary_file_is_named(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.toml"
    monkeypatch.setenv("MODEL_CONFIG", str(missing))
    with pytest.raises(ConfigError, match=rf"MODEL_CONFIG: {missing}: cannot read it: No such file"):
        load_settings()
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[mobilenet_v2]")
    with pytest.raises(ValueError, match=rf"{binary}: not UTF-8 text"):
        read_model_config(binary)


def test_the_file_over_the_defaults_and_a_set_variable_over_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_CONFIG", str(_write(tmp_path, TUNED)))
    settings = load_settings()
    cpu = settings.for_model("mobilenet_v2", "onnxruntime-cpu")
    assert cpu.batching == BatchingPolicy(4, 2.0, 2)
    assert (cpu.intra_op_threads, cpu.inter_op_threads, cpu.execution_mode) == (2, 1, "parallel")
    assert cpu.precision == "int8" and cpu.max_batch_size_asked == 4
    assert set(cpu.sources.values()) == {"file"}
    assert cpu.model_config_file == str(tmp_path / "model_config.toml")

    # A table applies to the name it spells only; what it leaves out is the backend's default.
    fp16 = settings.for_model("shufflenet_v2:fp16", "onnxruntime-cuda")
    assert fp16.batching == BatchingPolicy(GPU_BATCHING.max_batch_size, GPU_BATCHING.max_queue_delay_ms, 1)
    assert fp16.precision == "fp16" and fp16.max_batch_size_asked is None
    assert fp16.sources["max_concurrent_batches"] == "file" and fp16.sources["max_batch_size"] == "default"
    plain = settings.for_model("shufflenet_v2", "onnxruntime-cpu")
    assert plain.batching == BatchingPolicy(CPU_BATCHING.max_batch_size, 0.0, cpu_count() + 1)
    assert plain.precision == "fp32" and set(plain.sources.values()) == {"default"}
    assert settings.batching_for("onnxruntime-cpu") == plain.batching

    monkeypatch.setenv("MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("INTRA_OP_THREADS", "1")  # set to its default value: still set, so it wins
    overridden = load_settings().for_model("mobilenet_v2", "onnxruntime-cpu")
    assert overridden.batching == BatchingPolicy(8, 2.0, 2) and overridden.intra_op_threads == 1
    assert overridden.sources["max_batch_size"] == overridden.sources["intra_op_threads"] == "environment"
    assert overridden.sources["max_queue_delay_ms"] == "file" and overridden.max_batch_size_asked == 8


def test_what_render_writes_reads_back_the_same(tmp_path):
    sections = {
        "mobilenet_v2": {"precision": "int8", "max_batch_size": 1, "max_queue_delay_ms": 0.0},
        "shufflenet_v2:fp16": {"max_concurrent_batches": 3, "intra_op_threads": 2},
    }
    text = render_model_config(sections, comments=("made by a test", "second line"))
    assert text.startswith("# made by a test\n# second line\n\n[mobilenet_v2]\n")
    assert '["shufflenet_v2:fp16"]' in text
    read = read_model_config(_write(tmp_path, text))
    assert {name: section.given() for name, section in read.items()} == sections
    with pytest.raises(ValueError, match=r"\[mobilenet_v2\] max_batch_size"):
        render_model_config({"mobilenet_v2": {"max_batch_size": 0}})
    with pytest.raises(ValueError, match="not a model name"):
        render_model_config({"resnet50": {"max_batch_size": 2}})


@pytest.fixture(scope="module")
def int8_repo(tmp_path_factory) -> Path:
    """The tiny test models, mobilenet_v2 with an int8 build recorded."""
    root = make_repository(tmp_path_factory.mktemp("model-config") / "model_repository")
    model_dir = root / "mobilenet_v2"
    split = precision.split_images(calibration_count=4, held_out_count=4)
    variant = precision.build_variant(model_dir, Manifest.load(model_dir), "int8", split=split)
    precision.with_variant(Manifest.load(model_dir), variant).save(model_dir)
    return root


def test_a_served_model_runs_with_its_table_and_models_shows_it(int8_repo, tmp_path):
    path = _write(
        tmp_path,
        '[mobilenet_v2]\nprecision = "int8"\nmax_batch_size = 2\nmax_queue_delay_ms = 1.5\n'
        "intra_op_threads = 2\n\n[shufflenet_v1]\nmax_batch_size = 3\n",
    )
    # serving_settings sets every batching and thread variable; these stay unset, so the file decides.
    kept_unset = {"max_batch_size", "max_queue_delay_ms", "max_concurrent_batches", "intra_op_threads"}
    base = serving_settings(int8_repo).model_dump(exclude=kept_unset | {"models", "model_config_file"})
    served = ("mobilenet_v2", "mobilenet_v2:int8", "shufflenet_v2")
    settings = Settings(**base, models=served, model_config=path)
    app = create_app(settings)
    with serving(app) as client:
        assert client.get("/readyz").status_code == 200
        listed = {m["name"]: m for m in client.get("/models").json()["models"]}
        tuned = listed["mobilenet_v2"]
        # The plain name serves the int8 build, as the table asks.
        assert tuned["precision"] == "int8"
        assert tuned["settings"] == {
            "max_batch_size": 2,
            "max_queue_delay_ms": 1.5,
            "max_concurrent_batches": cpu_count() + 1,
            "intra_op_threads": 2,
            "inter_op_threads": 1,
            "execution_mode": "sequential",
            "precision": "int8",
            "sources": {
                "max_batch_size": "file",
                "max_queue_delay_ms": "file",
                "max_concurrent_batches": "default",
                "intra_op_threads": "file",
                # serving_settings sets these: set, they win, wherever they are set from
                "inter_op_threads": "environment",
                "execution_mode": "environment",
                "precision": "file",
            },
            "model_config_file": str(path),
        }
        assert tuned["batching"]["max_batch_size"] == 2 and tuned["batching"]["max_queue_delay_ms"] == 1.5
        # Another name of the same model is not covered by the plain name's table.
        untouched = listed["mobilenet_v2:int8"]
        assert untouched["settings"]["max_batch_size"] == 1 and untouched["batching"]["max_batch_size"] == 1
        assert set(untouched["settings"]["sources"].values()) <= {"default", "environment"}
        assert listed["shufflenet_v2"]["settings"]["precision"] == "fp32"
        detail = client.get("/models/mobilenet_v2").json()
        assert detail["settings"] == tuned["settings"]
        answer = client.post(
            "/classify",
            params={"model": "mobilenet_v2"},
            content=photo_jpeg(64, 48, seed=1),
            headers={"Content-Type": "image/jpeg"},
        )
        assert answer.status_code == 200, answer.text
        # The int8 build's logits, under the plain name: the same ranking as the int8 name gives.
        same = client.post(
            "/classify",
            params={"model": "mobilenet_v2:int8"},
            content=photo_jpeg(64, 48, seed=1),
            headers={"Content-Type": "image/jpeg"},
        )
        assert answer.json()["predictions"] == same.json()["predictions"]
