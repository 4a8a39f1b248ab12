"""Two decoder forms in one bundle for UniRS (VILA-1.5) and Qwen2.5-VL, through the same FormStore and manifest
``forms`` as RSUniVLM's (tests/test_forms.py): ``--target cpu --also-target jp6.1`` exports and validates both forms,
the CPU answers as the one-form cpu bundle does, the TensorRT check passes on the Q/DQ form and the manifest lists
both forms with their graphs' hashes. What a family cannot carry is refused in one line before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsedge.export.bundle import export_bundle
from rsedge.export.targets import export_options
from rsedge.models.unirs import make_checkpoint as make_unirs
from rsedge.runtime.bundle import Bundle
from rsedge.runtime.pipeline import Pipeline
from tests.qwen2_5_vl_helpers import tiny_checkpoint as make_qwen
from tests.test_bad_input import assert_one_error_line, run

STEPS = 8


def _export(ckpt: Path, out: Path, first: str, also: str | None = None, **kw) -> Path:
    explicit = {"prefill": kw.pop("prefill")} if "prefill" in kw else {}
    opts = export_options(first, "int4", explicit)
    export_bundle(ckpt, out, **opts, block_size=64, target=first, also_target=also, **kw)  # 64: the hidden size
    return out


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _image(seed: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A smooth scene (noise would make every answer a coin toss)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    chans = [127 + 120 * np.sin(6.3 * (a * xx + b * yy) + c) for a, b, c in rng.uniform(0.3, 3.0, (3, 3))]
    return Image.fromarray(np.stack(chans, -1).astype(np.uint8))


def _tokens(pipe: Pipeline, requests: list[tuple[list[Image.Image], str]]) -> list[list[int]]:
    return [pipe.generate(images, q, max_new_tokens=STEPS, ignore_eos=True).tokens for images, q in requests]


def _check_forms(two: Path, single: Path, first_graphs: list[str], second_graphs: list[str], shared: list[str]):
    """The manifest's forms (both, with each graph's sha256 and reads), the first form where a one-form bundle of
    its target has it, byte for byte."""
    m, one = _manifest(two), _manifest(single)
    files = m["files"]
    ort, qdq = m["forms"]["ort"], m["forms"]["qdq"]
    assert (ort["primary"], ort["target"], ort["engine"], ort["compute_dtype"]) == (True, "cpu", "onnxruntime", "fp32")
    assert (qdq["target"], qdq["engine"], qdq["compute_dtype"], qdq["attention"]) == ("jp6.1", "tensorrt", "fp16",
                                                                                       "standard")  # fmt: skip
    assert qdq["quantization"]["decoder"]["form"] == "qdq" and m["quantization"]["decoder"]["form"] == "ort"
    trt = qdq["tensorrt_check"]
    assert (trt["jetpack"], trt["passes"], trt["problems"]) == ("jp6.1", True, [])
    assert sorted(ort["graphs"]) == first_graphs and sorted(qdq["graphs"]) == second_graphs
    for form in (ort, qdq):
        for rel, g in form["graphs"].items():
            assert g["sha256"] == files[rel]["sha256"] and g["reads"] and all(r in files for r in g["reads"])
    assert qdq["graphs"]["decoder_expert0.qdq.onnx"]["reads"] == ["decoder_expert0.qdq.bin", "decoder_shared.qdq.bin"]
    assert {rel: files[rel]["bytes"] for rel in qdq["weights"]["files"]} == qdq["weights"]["files"]
    assert "two byte layouts" in qdq["weights"]["quantized_linears"]
    # the second form validated on its decoder alone (the vision-side graphs are one set, checked with the first)
    assert [c["graph"] for c in qdq["validation"]["graphs"]] == ["decoder_expert0"]
    assert all(c["passed"] for c in [*m["validation"]["graphs"], *qdq["validation"]["graphs"]])
    for key in ("compute_dtype", "quantization", "runtime", "arrays", "graphs"):
        assert m[key] == one[key], key
    assert "forms" not in one
    for rel in shared:
        assert files[rel]["sha256"] == one["files"][rel]["sha256"], rel


# -- UniRS (VILA-1.5 with the change module) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def unirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("unirs_forms")
    ckpt = make_unirs(root / "ckpt", size="tiny", seed=21)
    return {
        "ckpt": ckpt,
        "two": _export(ckpt, root / "two", "cpu", "jp6.1"),  # both forms validated
        "cpu": _export(ckpt, root / "cpu", "cpu", validate=False),
        "jp": _export(ckpt, root / "jp", "jp6.1", validate=False),
    }


UNIRS_REQUESTS = [
    ([_image(1)], "What is in this image?"),
    ([_image(2), _image(3)], "Please briefly describe the changes in these two images."),
]


def test_unirs_manifest_lists_both_forms_and_the_first_is_the_cpu_bundle(unirs):
    _check_forms(
        unirs["two"],
        unirs["cpu"],
        ["decoder_expert0.onnx", "decoder_prefill_expert0.onnx"],
        ["decoder_expert0.qdq.onnx"],
        ["decoder_expert0.onnx", "decoder_shared.bin", "decoder_prefill_expert0.onnx", "vision_int8.onnx",
         "projector.onnx", "projector.bin", "change.onnx", "change.bin"],
    )  # fmt: skip
    first = [c["graph"] for c in _manifest(unirs["two"])["validation"]["graphs"]]
    assert first[:3] == ["vision", "projector", "change"]


def test_unirs_cpu_answers_as_the_one_form_cpu_bundle(unirs):
    pipe = Pipeline.load(unirs["two"], device="cpu")
    assert pipe.bundle.form == "ort" and pipe.bundle.graph("decoder")["experts"]["0"]["file"] == "decoder_expert0.onnx"
    assert _tokens(pipe, UNIRS_REQUESTS) == _tokens(Pipeline.load(unirs["cpu"]), UNIRS_REQUESTS)


def test_unirs_check_trt_passes_on_the_qdq_form(unirs):
    res = run("check-trt", unirs["two"], "--target", "jp6.1")
    assert res.exit_code == 0, res.output
    assert res.output.startswith("jp6.1 (TensorRT 10.3): PASS") and "decoder_expert0.qdq.onnx: ok" in res.output
    assert "decoder_expert0.onnx" not in res.output


def test_unirs_engines_are_built_from_and_run_the_qdq_form(unirs, tmp_path, monkeypatch):
    from rsedge.export.trt_build import build_bundle
    from tests.trt_fakes import install

    install(monkeypatch)
    build_bundle(unirs["two"], tmp_path / "e", max_prompt=400, max_total=420, max_images=2)
    record = json.loads((tmp_path / "e" / "engines.json").read_text())
    assert sorted(record["engines"]) == ["decoder_expert0.qdq.onnx", "vision_int8.onnx"]
    pipe = Pipeline.load(unirs["two"], engines=tmp_path / "e")
    assert pipe.bundle.form == "qdq"
    # the fake engines run the graphs with onnxruntime: the answer is the jp6.1 bundle's own on the CPU provider
    assert _tokens(pipe, UNIRS_REQUESTS[:1]) == _tokens(Pipeline.load(unirs["jp"]), UNIRS_REQUESTS[:1])


def test_unirs_jetpack_first_carries_the_cpu_form_with_its_prefill_twin(unirs, tmp_path):
    _export(unirs["ckpt"], tmp_path / "b", "jp6.1", "cpu")
    m = _manifest(tmp_path / "b")
    ort = m["forms"]["ort"]
    assert m["forms"]["qdq"]["primary"] and ort["decoder"]["prefill"]["op"] == "DynamicQuantizeMatMul"
    assert sorted(ort["graphs"]) == ["decoder_expert0.ort.onnx", "decoder_prefill_expert0.ort.onnx"]
    assert [c["graph"] for c in ort["validation"]["graphs"]] == [
        "decoder_expert0-weights", "decoder_expert0", "decoder_prefill_expert0"
    ]  # fmt: skip
    pipe = Pipeline.load(tmp_path / "b")
    assert pipe.bundle.form == "ort" and pipe.bundle.graph("decoder")["experts"]["0"]["prefill_file"] == (
        "decoder_prefill_expert0.ort.onnx"
    )
    assert len(_tokens(pipe, UNIRS_REQUESTS[:1])[0]) == STEPS


# -- Qwen2.5-VL ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen_forms")
    ckpt = make_qwen(root)
    # --prefill same: the cpu target's INT8 prefill twin is not built for Qwen2.5-VL
    return {
        "ckpt": ckpt,
        "two": _export(ckpt, root / "two", "cpu", "jp6.1", prefill="same"),
        "cpu": _export(ckpt, root / "cpu", "cpu", prefill="same", validate=False),
    }


QWEN_REQUESTS = [([_image(4, (150, 96))], "Locate the storage tank and output its bbox_2d in JSON.")]


def test_qwen_manifest_lists_both_forms_and_the_first_is_the_cpu_bundle(qwen):
    _check_forms(qwen["two"], qwen["cpu"], ["decoder_expert0.onnx"], ["decoder_expert0.qdq.onnx"],
                 ["decoder_expert0.onnx", "decoder_shared.bin", "vision_int8.onnx"])  # fmt: skip
    m = _manifest(qwen["two"])
    assert m["forms"]["qdq"]["decoder"]["rope"] == m["graphs"]["decoder"]["rope"]  # the multimodal rotary record
    inputs = [i["name"] for i in m["forms"]["qdq"]["decoder"]["experts"]["0"]["inputs"]]
    assert "rope_position_ids" in inputs
    view = Bundle.open(qwen["two"]).for_device("tensorrt")
    assert view.form == "qdq" and view.graph("decoder")["experts"]["0"]["file"] == "decoder_expert0.qdq.onnx"


def test_qwen_cpu_answers_as_the_one_form_cpu_bundle(qwen):
    pipe = Pipeline.load(qwen["two"], device="cpu")
    assert pipe.bundle.form == "ort"
    assert _tokens(pipe, QWEN_REQUESTS) == _tokens(Pipeline.load(qwen["cpu"]), QWEN_REQUESTS)


def test_qwen_check_trt_passes_on_the_qdq_form(qwen):
    res = run("check-trt", qwen["two"], "--target", "jp6.1")
    assert res.exit_code == 0, res.output
    assert "decoder_expert0.qdq.onnx: ok" in res.output and "decoder_expert0.onnx" not in res.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        # the cpu form brings its INT8 prefill twin and no flag drops it from a second form
        (["--target", "jp6.1", "--also-target", "cpu"],
         "--also-target cpu: that target's form carries an INT8 prefill twin, which is not built for Qwen2.5-VL "
         "bundles yet; make it the first form: --target cpu --prefill same --also-target jp6.1"),
        (["--target", "cpu", "--also-target", "jp6.1"],
         "an INT8 prefill twin is not built for Qwen2.5-VL bundles yet (--target cpu adds one by default; "
         "--prefill same leaves it out)"),
    ],
)  # fmt: skip
def test_qwen_refuses_what_it_cannot_carry_in_one_line_before_any_work(qwen, args, needle, tmp_path, monkeypatch):
    import rsedge.models.qwen2_5_vl.exporter as exporter

    def no_work(*a, **k):
        raise AssertionError("the checkpoint's tensors were read")

    monkeypatch.setattr(exporter, "load_checkpoint_tensors", no_work)
    res = run("export", qwen["ckpt"], "-o", tmp_path / "out", "--precision", "int4", "--block-size", "64", *args)
    assert_one_error_line(res, needle)
    assert res.exit_code == 2 and not (tmp_path / "out").exists()
