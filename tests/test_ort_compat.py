"""The runtime on the onnxruntime at hand: a bundle it can run answers as the newest onnxruntime does; one it
cannot run is refused with one line naming the version it needs, before any session is made.

scripts/test.sh runs this module twice: in .venv, and in a venv with the oldest onnxruntime the runtime extra
allows and no torch. Both read the bundles and answers that

    .venv/bin/python -m tests.test_ort_compat export DIR

writes with the newest onnxruntime (RSEDGE_COMPAT_BUNDLES=DIR); without that variable the bundles are exported
here (that needs torch). Only numpy, onnxruntime, tokenizers, Pillow, click and pytest are imported at the top.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from rsedge.demo import SAMPLES
from rsedge.runtime import ort_support

pytestmark = pytest.mark.ort_compat

ROOT = Path(__file__).resolve().parents[1]
ENV = "RSEDGE_COMPAT_BUNDLES"
# One bundle per graph form the runtime must either run or refuse (export_bundle options). Validation is left to
# the export tests: these are fixtures for the runtime.
FORMS: dict[str, dict] = {
    "fp32": {"precision": "fp32"},
    "fp16": {"precision": "fp16"},
    "fp32-gqa-shared": {"precision": "fp32", "attention": "gqa-shared"},
    "int4": {"precision": "int4"},  # MatMulNBits bits 4 + fused attention: the CPU default
    "int4-prefill-int8": {"precision": "int4", "prefill": "int8"},  # --target cpu: a DynamicQuantizeMatMul twin
    "int8": {"precision": "int8"},  # MatMulNBits bits 8, static INT8 vision
}
REQUESTS = (
    (("dior_05863.png",), "[VG] Where is the building?"),
    (("levircc_test_000289_A.png", "levircc_test_000289_B.png"), "[CCD] Please briefly describe the changes."),
)
MAX_NEW_TOKENS = 6


def answers(bundle: Path) -> list[list[int]]:
    from rsedge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, verify="size")
    return [
        pipe.generate([SAMPLES / i for i in images], prompt, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True).tokens
        for images, prompt in REQUESTS
    ]


def export_all(out: Path, model: Path | None = None) -> None:
    """Every form of the built-in model under ``out``, and ``expected.json``: this onnxruntime's answers."""
    from rsedge.demo import BUILTIN_MODEL
    from rsedge.export.bundle import export_bundle

    out.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, options in FORMS.items():
        export_bundle(model or BUILTIN_MODEL, out / name, validate=False, **options)
        expected[name] = answers(out / name)
    import onnxruntime

    (out / "expected.json").write_text(json.dumps({"onnxruntime": onnxruntime.__version__, "answers": expected}))


@pytest.fixture(scope="module")
def compat(tmp_path_factory) -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("compat")
    export_all(out)
    return out


def run_cli(*args) -> object:
    from rsedge.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def run_args(bundle: Path) -> list:
    return ["run", bundle, "--image", SAMPLES / "dior_05863.png", "--prompt", "[VG] Where?", "--max-new-tokens", "2"]


@pytest.fixture
def no_sessions(monkeypatch) -> None:
    """Any onnxruntime session made from here on fails the test."""
    import onnxruntime

    def refuse(*a, **k):
        raise AssertionError("a session was created for a bundle this onnxruntime was to refuse")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


@pytest.mark.parametrize("form", list(FORMS))
def test_runs_as_the_newest_or_is_refused_in_one_line(compat, form, request):
    import onnxruntime

    bundle = compat / form
    manifest = json.loads((bundle / "manifest.json").read_text())
    problem = ort_support.refusal(manifest, onnxruntime.__version__)
    if problem is None:
        expected = json.loads((compat / "expected.json").read_text())
        assert answers(bundle) == expected["answers"][form], f"onnxruntime {onnxruntime.__version__} vs {expected}"
    else:
        request.getfixturevalue("no_sessions")
        res = run_cli(*run_args(bundle))
        assert res.exit_code != 0
        assert res.stderr.strip().splitlines() == [f"error: {problem}"]
        assert f"this is {onnxruntime.__version__}" in problem


def test_every_form_records_what_it_needs(compat):
    """The manifests carry the versions measured with scripts/ort_versions.py, not a stale or missing field."""
    need = {f: ort_support.requirement(json.loads((compat / f / "manifest.json").read_text())) for f in FORMS}
    assert {f: n["min"] for f, n in need.items()} == {
        "fp32": ort_support.MIN_SUPPORTED,
        "fp16": ort_support.MIN_SUPPORTED,
        "fp32-gqa-shared": "1.18.0",
        "int4": "1.19.0",
        "int4-prefill-int8": "1.19.0",
        "int8": "1.22.0",
    }
    assert need["int8"]["needs"] == "INT8 MatMulNBits"


@pytest.mark.parametrize(
    ("form", "version", "line"),
    [
        ("int8", "1.21.1", "this bundle needs onnxruntime >= 1.22.0 (INT8 MatMulNBits); this is 1.21.1"),
        ("int4", "1.18.1", "this bundle needs onnxruntime >= 1.19.0 (INT4 MatMulNBits); this is 1.18.1"),
        ("fp32-gqa-shared", "1.17.3", "needs onnxruntime >= 1.18.0 (float32 GroupQueryAttention); this is 1.17.3"),
        ("fp32", "1.14.1", "needs onnxruntime >= 1.15.0 (ONNX opset 17); this is 1.14.1"),
    ],
)
def test_an_older_onnxruntime_is_refused_before_any_session(compat, form, version, line, monkeypatch, no_sessions):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", version)
    res = run_cli(*run_args(compat / form))
    assert res.exit_code != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith(line), lines


def test_newer_and_unknown_versions_pass_the_check():
    manifest = {"runtime": ort_support.summarize({"opset17", "matmulnbits-8"})}
    for version in ("1.22.0", "1.23.2", "1.32.0", "2.0.0", "1.22.0+cu126", "1.23.0.dev20250101", "custom"):
        assert ort_support.refusal(manifest, version) is None, version
    assert ort_support.refusal({}, "1.0.0") is None  # a bundle from before the field: onnxruntime decides


def test_a_release_known_broken_for_a_feature_is_refused():
    manifest = {"runtime": ort_support.summarize({"opset17", "gqa-fp16", "skip-simplified-layernorm-fp16"})}
    assert ort_support.refusal(manifest, "1.20.0") == (
        "this bundle needs onnxruntime >= 1.18.0 other than 1.20.0 (float16 SkipSimplifiedLayerNormalization fails "
        "in 1.20.0); this is 1.20.0"
    )
    assert ort_support.refusal(manifest, "1.19.2") is None
    assert ort_support.refusal(manifest, "1.20.1") is None


def test_the_runtime_table_raises_a_stale_recorded_minimum():
    """A bundle exported by an rsedge that knew less still gets this rsedge's minimum for the features it lists."""
    stale = {"runtime": {"onnxruntime_min": "1.17.0", "needs": "INT8 MatMulNBits", "features": ["matmulnbits-8"]}}
    line = ort_support.refusal(stale, "1.21.1")
    assert line == "this bundle needs onnxruntime >= 1.22.0 (INT8 MatMulNBits); this is 1.21.1"


@pytest.mark.parametrize("garbage", [[], {"onnxruntime_min": 5, "needs": "x"}, {"onnxruntime_min": "1.2", "needs": 1}])
def test_garbage_runtime_field_is_one_bundle_error(garbage):
    from rsedge.errors import BundleError

    with pytest.raises(BundleError, match="manifest field runtime"):
        ort_support.refusal({"runtime": garbage}, "1.20.0")


def test_device_tensorrt_needs_the_gpu_minimum():
    line = ort_support.refusal({}, "1.16.3", device="tensorrt")
    assert line == (
        "--device tensorrt needs onnxruntime-gpu >= 1.17.0 (TensorRT provider option trt_timing_cache_path); "
        "this is 1.16.3"
    )
    assert ort_support.refusal({}, "1.16.3", device="cuda") is None


def test_cpu_kernel_findings_do_not_bind_a_gpu_device():
    """The --target cuda form (MatMulNBits on float16): wrong on the CPU before 1.23, its own kernels on CUDA."""
    manifest = {"runtime": ort_support.summarize({"opset17", "matmulnbits-4", "matmulnbits-fp16", "gqa-fp16"})}
    assert "needs onnxruntime >= 1.23.0 (MatMulNBits on float16" in ort_support.refusal(manifest, "1.20.1")
    assert ort_support.refusal(manifest, "1.20.1", device="cuda") is None
    assert "needs onnxruntime >= 1.19.0 (INT4 MatMulNBits)" in ort_support.refusal(manifest, "1.18.1", device="cuda")
    fp32_gqa = {"runtime": ort_support.summarize({"opset17", "gqa"})}  # CUDA leaves float32 GQA to the CPU
    assert "needs onnxruntime >= 1.18.0" in ort_support.refusal(fp32_gqa, "1.17.3", device="cuda")


def test_pyproject_extras_require_the_supported_minimum():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"onnxruntime>={ort_support.MIN_SUPPORTED}" in extras["runtime"]
    assert f"onnxruntime-gpu>={ort_support.MIN_SUPPORTED_GPU}" in extras["gpu"]


if __name__ == "__main__":  # python -m tests.test_ort_compat export DIR
    if len(sys.argv) != 3 or sys.argv[1] != "export":
        sys.exit("usage: python -m tests.test_ort_compat export DIR")
    export_all(Path(sys.argv[2]))
