"""One bundle, two decoder forms: ``rsedge export --target cpu --also-target jp6.1`` writes the MatMulNBits decoders
for onnxruntime and the explicit Q/DQ decoders for TensorRT beside them, validates both, checks the TensorRT form
statically, and the runtime picks the form by device. A bundle with one form reads as before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from rsedge.errors import BundleError, OptionError
from rsedge.export.bundle import ExportOptions, export_bundle
from rsedge.export.targets import export_options
from rsedge.runtime.bundle import Bundle
from rsedge.runtime.pipeline import Pipeline
from tests.test_backends import REQUESTS
from tests.test_bad_input import assert_one_error_line, run

INT4 = {"precision": "int4", "block_size": 64}  # the tiny model's hidden size is 64: TensorRT's INT4 block
STEPS = 8


def _export(ckpt: Path, out: Path, first: str, also: str | None = None, **kw) -> Path:
    export_bundle(ckpt, out, **export_options(first, "int4", {}), block_size=64, target=first, also_target=also, **kw)
    return out


@pytest.fixture(scope="module")
def two_form(tiny_checkpoint, tmp_path_factory) -> Path:
    """cpu + jp6.1, validated (both forms against the reference)."""
    return _export(tiny_checkpoint, tmp_path_factory.mktemp("forms") / "two", "cpu", "jp6.1")


@pytest.fixture(scope="module")
def cpu_only(tiny_checkpoint, tmp_path_factory) -> Path:
    return _export(tiny_checkpoint, tmp_path_factory.mktemp("forms") / "cpu", "cpu", validate=False)


@pytest.fixture(scope="module")
def jp_only(tiny_checkpoint, tmp_path_factory) -> Path:
    return _export(tiny_checkpoint, tmp_path_factory.mktemp("forms") / "jp", "jp6.1", validate=False)


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _tokens(pipe: Pipeline, samples: Path, requests=REQUESTS[:2]) -> list[list[int]]:
    return [
        pipe.generate([samples / p for p in paths], prompt, max_new_tokens=STEPS, ignore_eos=True).tokens
        for paths, prompt in requests
    ]


def test_manifest_lists_both_forms_with_hashes_and_checks(two_form, cpu_only):
    m, files = _manifest(two_form), _manifest(two_form)["files"]
    ort, qdq = m["forms"]["ort"], m["forms"]["qdq"]
    assert (ort["primary"], ort["target"], ort["engine"], ort["compute_dtype"]) == (True, "cpu", "onnxruntime", "fp32")
    assert (qdq["target"], qdq["engine"], qdq["compute_dtype"], qdq["attention"]) == ("jp6.1", "tensorrt", "fp16",
                                                                                       "standard")  # fmt: skip
    assert ort["onnxruntime_min"] == m["runtime"]["onnxruntime_min"]
    assert qdq["onnxruntime_min"] == qdq["runtime"]["onnxruntime_min"]
    assert "qdq-int4-blocked" in qdq["runtime"]["features"]
    assert qdq["quantization"]["decoder"]["form"] == "qdq" and m["quantization"]["decoder"]["form"] == "ort"
    trt = qdq["tensorrt_check"]
    assert (trt["jetpack"], trt["tensorrt"], trt["passes"], trt["problems"]) == ("jp6.1", "10.3", True, [])
    assert "tensorrt_check" not in ort
    # every graph of each form with its sha256 (the one files has) and the weight files it reads
    assert sorted(ort["graphs"]) == sorted([f"decoder_expert{e}.onnx" for e in range(3)]
                                           + [f"decoder_prefill_expert{e}.onnx" for e in range(3)])  # fmt: skip
    assert sorted(qdq["graphs"]) == [f"decoder_expert{e}.qdq.onnx" for e in range(3)]
    for form in (ort, qdq):
        for rel, g in form["graphs"].items():
            assert g["sha256"] == files[rel]["sha256"] and all(r in files for r in g["reads"])
    assert qdq["graphs"]["decoder_expert1.qdq.onnx"]["reads"] == ["decoder_expert1.qdq.bin", "decoder_shared.qdq.bin"]
    assert {rel: files[rel]["bytes"] for rel in qdq["weights"]["files"]} == qdq["weights"]["files"]
    # both forms validated; the vision graph (one, shared) once
    assert [c["graph"] for c in qdq["validation"]["graphs"]] == [f"decoder_expert{e}" for e in range(3)]
    assert m["validation"]["graphs"][0]["graph"] == "vision"
    # the first form is where a one-form bundle has it, the same as the cpu target's own bundle
    single = _manifest(cpu_only)
    for key in ("compute_dtype", "quantization", "runtime", "arrays"):
        assert m[key] == single[key], key
    assert m["graphs"] == single["graphs"] and "forms" not in single
    for rel in ("decoder_expert0.onnx", "decoder_shared.bin", "vision_int8.onnx", "decoder_prefill_expert0.onnx"):
        assert files[rel]["sha256"] == single["files"][rel]["sha256"], rel


def test_the_forms_carry_the_same_int4_codes_in_two_layouts(two_form):
    """What keeps the quantized weights from being stored once: the same numbers, not the same bytes."""

    def init(graph: str, name: str) -> np.ndarray:
        model = onnx.load(str(two_form / graph), load_external_data=True)
        return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)

    w = "model.layers.0.self_attn.o_proj.weight_t"
    packed, ort_scales = init("decoder_expert0.onnx", f"{w}.q4"), init("decoder_expert0.onnx", f"{w}.scales")
    qdq_codes, qdq_scales = init("decoder_expert0.qdq.onnx", f"{w}.q4"), init("decoder_expert0.qdq.onnx", f"{w}.scales")
    n, blocks, _ = packed.shape
    unsigned = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1).astype(np.int16)
    assert np.array_equal(unsigned - 8, qdq_codes.T.astype(np.int16))  # [N, K] unsigned vs [K, N] signed
    assert ort_scales.dtype == np.float32 and qdq_scales.dtype == np.float16
    np.testing.assert_allclose(ort_scales.reshape(n, blocks).T, qdq_scales.astype(np.float32), rtol=1e-3)
    note = _manifest(two_form)["forms"]["qdq"]["weights"]
    assert "two byte layouts" in note["quantized_linears"] and set(note["layouts"]) == {"ort", "qdq"}


def test_cpu_answers_as_the_one_form_cpu_bundle(two_form, cpu_only, samples):
    pipe = Pipeline.load(two_form, device="cpu")
    assert pipe.bundle.form == "ort" and pipe.bundle.graph("decoder")["experts"]["0"]["file"] == "decoder_expert0.onnx"
    assert pipe.bundle.graph("decoder")["experts"]["0"]["prefill_file"] == "decoder_prefill_expert0.onnx"
    assert _tokens(pipe, samples) == _tokens(Pipeline.load(cpu_only), samples)


def test_tensorrt_devices_read_the_qdq_form(two_form, tiny_bundle):
    bundle = Bundle.open(two_form)
    assert bundle.form == "ort" and bundle.for_device("cpu") is bundle and bundle.for_device("cuda") is bundle
    for device in ("tensorrt", "tensorrt-engine"):
        view = bundle.for_device(device)
        assert view.form == "qdq" and view.manifest["compute_dtype"] == "fp16"
        assert view.graph("decoder")["experts"]["2"]["file"] == "decoder_expert2.qdq.onnx"
        assert view.manifest["quantization"]["decoder"]["form"] == "qdq" and not view.shared_kv
        assert view.for_device("cpu").manifest is bundle.manifest  # back to the first form
        assert view.manifest_bytes == bundle.manifest_bytes  # the same signed bundle
    one = Bundle.open(tiny_bundle)  # a one-form bundle: no forms, every device reads it as it is
    assert one.form is None and all(one.for_device(d) is one for d in ("cpu", "cuda", "tensorrt"))


def test_check_trt_passes_on_the_qdq_form(two_form, cpu_only):
    res = run("check-trt", two_form, "--target", "jp6.1")
    assert res.exit_code == 0, res.output
    assert res.output.startswith("jp6.1 (TensorRT 10.3): PASS") and "decoder_expert0.qdq.onnx: ok" in res.output
    assert "decoder_expert0.onnx" not in res.output and "qdq decoder form" in res.output
    assert run("check-trt", cpu_only, "--target", "jp6.1").exit_code == 1  # MatMulNBits: onnxruntime-only


def test_engines_are_built_from_and_run_the_qdq_form(two_form, jp_only, samples, tmp_path, monkeypatch):
    from rsedge.export.trt_build import build_bundle
    from tests.trt_fakes import install

    install(monkeypatch)
    build_bundle(two_form, tmp_path / "e", max_prompt=256, max_total=320, max_images=2)
    record = json.loads((tmp_path / "e" / "engines.json").read_text())
    assert sorted(record["engines"]) == [*(f"decoder_expert{e}.qdq.onnx" for e in range(3)), "vision_int8.onnx"]
    pipe = Pipeline.load(two_form, engines=tmp_path / "e")
    assert pipe.bundle.form == "qdq"
    # the fake engines run the graphs with onnxruntime: the answer is the jp6.1 bundle's own on the CPU provider
    assert _tokens(pipe, samples, REQUESTS[1:2]) == _tokens(Pipeline.load(jp_only), samples, REQUESTS[1:2])


def test_a_tampered_second_form_file_is_refused(two_form, samples, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(two_form, bad)
    path = bad / "decoder_expert1.qdq.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"decoder_expert1\.qdq\.bin fails its sha256 check"):
        Bundle.open(bad)
    paths, prompt = REQUESTS[1]
    res = run("run", bad, "--image", samples / paths[0], "--prompt", prompt, "--max-new-tokens", "2")
    assert_one_error_line(res, "decoder_expert1.qdq.bin fails its sha256 check")

    def edit(change) -> Path:
        out = tmp_path / f"edit{len(list(tmp_path.iterdir()))}"
        shutil.copytree(two_form, out)
        m = _manifest(out)
        change(m)
        (out / "manifest.json").write_text(json.dumps(m))
        return out

    unlisted = edit(lambda m: m["forms"]["qdq"]["decoder"]["experts"]["0"].update(file="elsewhere.onnx"))
    with pytest.raises(BundleError, match=r"forms\.qdq\.decoder\.experts\.0\.file names 'elsewhere.onnx'"):
        Bundle.open(unlisted)
    fewer = edit(lambda m: m["forms"]["qdq"]["decoder"]["experts"].pop("2"))
    with pytest.raises(
        BundleError, match=r"\(qdq form\): manifest field router\.table\.\[SEG\] must be an expert index below 2"
    ):
        Bundle.open(fewer, verify="size")
    two_first = edit(lambda m: m["forms"]["qdq"].update(primary=True))
    with pytest.raises(BundleError, match="one primary form"):
        Bundle.open(two_first, verify="size")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--precision", "int4", "--also-target", "jp6.1"], "--also-target jp6.1 needs --target"),
        (["--precision", "int4", "--target", "cpu", "--also-target", "cuda"], "both take the ort form"),
        (["--precision", "int8", "--target", "jp6.1", "--also-target", "jp5.1"], "both take the qdq form"),
        (["--precision", "int4", "--target", "cpu", "--also-target", "jp5.1"], "target jp5.1 cannot run int4"),
        (["--precision", "fp16", "--target", "cpu", "--also-target", "jp6.1"], "has one decoder form"),
        (["--precision", "int4", "--target", "cpu", "--also-target", "jp6.1", "--block-size", "32"],
         "takes --block-size 64 or 128, not 32"),
        (["--precision", "int4", "--target", "cpu", "--form", "qdq", "--also-target", "jp6.2"], "both take the qdq"),
    ],
)  # fmt: skip
def test_bad_pairs_are_one_line_before_any_work(args, needle, tmp_path, monkeypatch):
    import rsedge.export.bundle as bundle

    def no_work(*a, **k):
        raise AssertionError("the export started")

    monkeypatch.setattr(bundle, "run_export", no_work)
    ckpt = tmp_path / "ckpt"  # config.json alone: nothing past it is read
    ckpt.mkdir()
    shutil.copy(Path(__file__).parent.parent / "rsedge/data/models/rsunivlm-demo/config.json", ckpt)
    res = run("export", ckpt, "-o", tmp_path / "out", *args)
    assert_one_error_line(res, needle)
    assert res.exit_code == 2 and not (tmp_path / "out").exists()


def test_the_api_refuses_the_same_pairs():
    with pytest.raises(OptionError, match="both take the ort form"):
        ExportOptions(**INT4, form="ort", target="cpu", also_target="cuda").resolve()
    jp = export_options("jp6.1", "int4", {})
    second = ExportOptions(**jp, block_size=64, target="jp6.1", also_target="cpu").resolve()
    assert (second.second.form, second.second.compute, second.second.prefill) == ("ort", "fp32", "int8")
    assert second.second.recipe.vision == second.recipe.vision == "int8"  # the first form's vision graph


def test_forms_of_one_compute_dtype_share_their_float_tensors(tiny_checkpoint, tmp_path):
    """cuda (MatMulNBits, fp16) + jp6.2 (Q/DQ, fp16): norms and biases are the same bytes, stored once and read by
    the second form from the first form's file; validation runs the second form on those reads."""
    m = export_bundle(tiny_checkpoint, tmp_path / "b", **export_options("cuda", "int4", {}), block_size=64,
                      target="cuda", also_target="jp6.2")  # fmt: skip
    qdq = m["forms"]["qdq"]
    shared = qdq["weights"]["shared_with_first_form"]
    assert shared["tensors"] > 0 and shared["bytes"] > 0
    assert "decoder_shared.bin" in qdq["graphs"]["decoder_expert0.qdq.onnx"]["reads"]
    assert len(qdq["validation"]["graphs"]) == 3 and qdq["tensorrt_check"]["jetpack"] == "jp6.2"
    Bundle.open(tmp_path / "b").for_device("tensorrt")  # every read among the hashed files


def test_a_jetpack_first_bundle_carries_the_cpu_form_with_its_prefill_twin(tiny_checkpoint, samples, tmp_path):
    """--target jp6.1 --also-target cpu: the second form is all the cpu target picks, its INT8 prefill twin too
    (named with the form's suffix, its attention weights stored once for every expert)."""
    _export(tiny_checkpoint, tmp_path / "b", "jp6.1", "cpu")
    m = _manifest(tmp_path / "b")
    assert m["forms"]["qdq"]["primary"] and m["quantization"]["decoder"]["form"] == "qdq"
    ort = m["forms"]["ort"]
    assert ort["prefill"] == "int8" and ort["decoder"]["prefill"]["op"] == "DynamicQuantizeMatMul"
    assert ort["graphs"]["decoder_prefill_expert1.ort.onnx"]["reads"] == [
        "decoder_prefill_expert1.ort.bin", "decoder_prefill_shared.ort.bin", "decoder_shared.ort.bin"
    ]  # fmt: skip
    assert [c["graph"] for c in ort["validation"]["graphs"]][:3] == [
        "decoder_expert0-weights", "decoder_expert0", "decoder_prefill_expert0"
    ]  # fmt: skip
    pipe = Pipeline.load(tmp_path / "b")
    assert pipe.bundle.form == "ort" and pipe.bundle.manifest["compute_dtype"] == "fp32"
    assert pipe.bundle.graph("decoder")["experts"]["0"]["prefill_file"] == "decoder_prefill_expert0.ort.onnx"
    assert len(_tokens(pipe, samples, REQUESTS[1:2])[0]) == STEPS
