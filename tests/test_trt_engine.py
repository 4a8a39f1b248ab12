"""TensorRT engines at run time: engines.json, the checks before use, and the TrtEngineDecoder backend.

Neither TensorRT nor a GPU is needed: ``tests.trt_fakes`` stands in for the tensorrt module (its engines run the
bundle's ONNX graphs with onnxruntime, on the tensors at the device addresses rsedge sets) and for cupy or
cuda-python (host memory posing as device memory, every allocation and copy logged). So these tests prove what
rsedge binds where and what crosses the bus; the real engine against onnxruntime is tests/test_trt.py's
``trt``-marked tests, which run only where tensorrt imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from rsedge.errors import BundleError, OptionError
from rsedge.export.trt_build import build_bundle, default_profiles
from rsedge.runtime.backends import DecoderSpec, backend_class
from rsedge.runtime.backends.trt_engine import TrtEngineDecoder
from rsedge.runtime.pipeline import Pipeline
from rsedge.runtime.sessions import SessionConfig
from rsedge.runtime.trt_session import TrtRunError
from tests.test_backends import REQUESTS
from tests.test_bad_input import assert_one_error_line, run
from tests.trt_fakes import FakeGpu, install

LIMITS = {"max_prompt": 256, "max_total": 320, "max_images": 2}
STEPS = 12


def _build(bundle: Path, out: Path, **limits) -> Path:
    build_bundle(bundle, out, **{**LIMITS, **limits})
    return out


def _answer(pipe: Pipeline, samples: Path, paths, prompt: str, n: int = STEPS):
    return pipe.generate([samples / p for p in paths], prompt, max_new_tokens=n, keep_logits=True, ignore_eos=True)


def _decoder_runs(gpu: FakeGpu) -> list[dict]:
    """Each decoder engine run: its copies, allocations and bindings (one synchronized segment each)."""
    runs = []
    for seg in gpu.segments():
        execs = [e for e in seg if e[0] == "exec"]
        if not execs or not execs[0][1].startswith("decoder"):
            continue
        assert len(execs) == 1, seg
        runs.append({
            "h2d": [e[1] for e in seg if e[0] == "h2d"],
            "d2h": [e[1] for e in seg if e[0] == "d2h"],
            "allocs": [(e[1], e[2]) for e in seg if e[0] == "alloc"],
            "bound": execs[0][2],
        })  # fmt: skip
    return runs


# -- building: engines.json ------------------------------------------------------------------------------------


def test_build_writes_engines_json(tiny_bundle, tmp_path, monkeypatch):
    trt, _ = install(monkeypatch, "10.3.0", FakeGpu("NVIDIA H200", (9, 0)))
    out = _build(tiny_bundle, tmp_path / "e")
    record = json.loads((out / "engines.json").read_text())
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    manifest_sha = hashlib.sha256((tiny_bundle / "manifest.json").read_bytes()).hexdigest()
    assert record["bundle"]["manifest_sha256"] == manifest_sha
    graphs = ["vision.onnx", *(f"decoder_expert{e}.onnx" for e in range(3))]
    assert record["bundle"]["graphs"] == {g: manifest["files"][g]["sha256"] for g in graphs}
    assert record["tensorrt"] == "10.3.0"
    assert record["gpu"] == {"name": "NVIDIA H200", "compute_capability": "9.0"}
    assert record["build"]["max_total"] == 320
    profiles = default_profiles(manifest, **LIMITS)
    assert set(record["engines"]) == set(graphs)
    for g, entry in record["engines"].items():
        engine = out / entry["file"]
        assert entry["file"] == g.replace(".onnx", ".engine")
        assert entry["sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
        assert entry["bytes"] == engine.stat().st_size
        assert entry["graph_sha256"] == manifest["files"][g]["sha256"]
        want = {n: {"min": list(lo), "opt": list(opt), "max": list(hi)} for n, (lo, opt, hi) in profiles[g].items()}
        assert entry["profile"] == want
        assert entry["precision"] == {"fp16": True, "int8": False, "strongly_typed": False}
    # what the record says is what the builder was given
    assert [m["profile"] for m in trt.built] == [
        {n: [r["min"], r["opt"], r["max"]] for n, r in record["engines"][g]["profile"].items()} for g in graphs
    ]


def test_build_needs_a_cuda_binding_for_the_gpu_record(tiny_bundle, tmp_path, monkeypatch):
    import sys

    install(monkeypatch)
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setitem(sys.modules, "cuda", None)
    with pytest.raises(Exception, match="cupy or cuda-python"):
        _build(tiny_bundle, tmp_path / "e")
    assert not (tmp_path / "e").exists()  # refused before anything was built


def test_rebuild_removes_the_old_record_first(tiny_bundle, tmp_path, monkeypatch):
    trt, _ = install(monkeypatch)
    out = _build(tiny_bundle, tmp_path / "e")

    def fail(*a, **k):
        raise RuntimeError("build failed")

    monkeypatch.setattr(trt.Builder, "build_serialized_network", fail)
    with pytest.raises(RuntimeError):
        _build(tiny_bundle, out)
    assert not (out / "engines.json").exists()


# -- running: the decoder backend ------------------------------------------------------------------------------


@pytest.mark.parametrize("binding,version", [("cupy", "10.3.0"), ("cuda-python", "8.6.2")])
def test_engine_decoder_matches_onnxruntime_cpu(tiny_bundle, samples, tmp_path, monkeypatch, binding, version):
    """Same greedy tokens and logits as the CPU backend, with the cache in one device allocation per request,
    ping-ponged between its two sides, and only the new rows crossing the bus."""
    _, gpu = install(monkeypatch, version, binding=binding)
    engines = _build(tiny_bundle, tmp_path / "e")
    cpu = Pipeline.load(tiny_bundle)
    pipe = Pipeline.load(tiny_bundle, engines=engines)
    assert type(pipe.decoder(0)) is TrtEngineDecoder and pipe.backend is backend_class("tensorrt-engine")
    gpu.events.clear()
    for paths, prompt in REQUESTS:
        want, got = _answer(cpu, samples, paths, prompt), _answer(pipe, samples, paths, prompt)
        assert got.tokens == want.tokens and got.text == want.text
        for a, b in zip(got.step_logits, want.step_logits, strict=True):
            np.testing.assert_array_equal(a, b)

    text = cpu.bundle.model["text"]
    hidden, vocab = text["hidden_size"], text["vocab_size"]
    pos_bytes = 8 if version.startswith("10") else 4  # TensorRT 8 binds the int64 position ids as int32
    runs = _decoder_runs(gpu)
    assert len(runs) == len(REQUESTS) * STEPS
    requests = [runs[k : k + STEPS] for k in range(0, len(runs), STEPS)]
    for req in requests:
        prefill, decode = req[0], req[1:]
        new = prefill["bound"]["inputs_embeds"][1][1]
        assert prefill["h2d"] == [new * hidden * 4, new * pos_bytes] and prefill["d2h"] == [vocab * 4]
        assert len(prefill["allocs"]) == 1  # the request's one allocation, made before its prefill
        for r in decode:  # per token: one embedding row and one position id up, one logits row down; no alloc
            assert r["h2d"] == [hidden * 4, pos_bytes] and r["d2h"] == [vocab * 4] and not r["allocs"]
        base, size = prefill["allocs"][0]
        for k, r in enumerate(req):
            for name, (ptr, _) in r["bound"].items():
                assert base <= ptr < base + size, f"{name} is not in the request's allocation"
            # ping-pong: this step's present is the next step's past, on the other side of the allocation
            for i in range(text["num_hidden_layers"]):
                for kind in ("key", "value"):
                    past, present = r["bound"][f"past_key_values.{i}.{kind}"], r["bound"][f"present.{i}.{kind}"]
                    assert past[0] != present[0] and present[1][2] == past[1][2] + r["bound"]["inputs_embeds"][1][1]
                    if k + 1 < len(req):
                        assert req[k + 1]["bound"][f"past_key_values.{i}.{kind}"] == present
    assert len({req[0]["allocs"][0] for req in requests}) == len(requests)


def test_concurrent_requests_take_turns_on_the_context(tiny_bundle, samples, tmp_path, monkeypatch):
    """One execution context serves every request of an expert: each step's bindings are set and run atomically
    (the fake engine fails a run whose bindings another thread touched), and each answer equals the serial one."""
    install(monkeypatch)
    engines = _build(tiny_bundle, tmp_path / "e")
    pipe = Pipeline.load(tiny_bundle, engines=engines)
    jobs = [REQUESTS[0], REQUESTS[3]] * 3  # the same expert (0), different prompt lengths
    serial = [_answer(pipe, samples, *job, n=8).tokens for job in jobs]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def worker(k: int) -> None:
        try:
            barrier.wait()
            results[k] = _answer(pipe, samples, *jobs[k], n=8).tokens
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert [results[k] for k in range(len(jobs))] == serial


def test_steps_outside_the_profile_are_refused_before_running(tiny_bundle, tmp_path, monkeypatch):
    _, gpu = install(monkeypatch)
    engines = _build(tiny_bundle, tmp_path / "e", max_prompt=8, max_total=16)
    pipe = Pipeline.load(tiny_bundle, engines=engines)
    dec = pipe.decoder(0)
    hidden = pipe.bundle.model["text"]["hidden_size"]
    with pytest.raises(OptionError, match=r"17 positions .*1\.\.8 new tokens after 0\.\.15 past ones"):
        dec.new_state(17)
    state = dec.new_state(16)
    gpu.events.clear()
    with pytest.raises(TrtRunError, match=r"a step of 9 new tokens after 0 past ones .*1\.\.8 new tokens"):
        dec.step(np.zeros((1, 9, hidden), dec.dtype), state)
    assert state.length == 0 and not [e for e in gpu.events if e[0] in ("exec", "h2d")]
    dec.step(np.zeros((1, 8, hidden), dec.dtype), state)  # the edges of the range run
    assert state.length == 8
    with pytest.raises(OptionError, match="KV cache full"):
        dec.step(np.zeros((1, 9, hidden), dec.dtype), state)


def test_cli_names_the_profile_range(tiny_bundle, samples, tmp_path, monkeypatch):
    install(monkeypatch)
    engines = _build(tiny_bundle, tmp_path / "e", max_prompt=16, max_total=32)
    res = run("run", tiny_bundle, "--engines", engines, "--image", samples / REQUESTS[0][0][0],
              "--prompt", REQUESTS[0][1], "--max-new-tokens", "4")  # fmt: skip
    assert_one_error_line(res, "outside the engine's optimization profile", "rsedge build-engines")


def test_fused_attention_bundles_have_no_engine_decoder():
    spec = DecoderSpec(2, 2, 16, shared_kv=True)
    with pytest.raises(OptionError, match="portable"):
        TrtEngineDecoder(Path("x.engine"), spec, SessionConfig())


def test_cli_run_with_engines(tiny_bundle, samples, tmp_path, monkeypatch):
    install(monkeypatch)
    engines = _build(tiny_bundle, tmp_path / "e")
    paths, prompt = REQUESTS[1]
    args = ["--image", samples / paths[0], "--prompt", prompt, "--max-new-tokens", "6", "--json"]
    want = run("run", tiny_bundle, *args)
    got = run("run", tiny_bundle, "--engines", engines, *args)
    assert got.exit_code == 0, got.stderr
    assert json.loads(got.stdout)["token_ids"] == json.loads(want.stdout)["token_ids"]


# -- running: engines.json checked before use ------------------------------------------------------------------


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _other_bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    other = tmp_path / "other"
    shutil.copytree(tiny_bundle, other)
    _edit_json(other / "manifest.json", lambda m: m["router"].update(default=1))
    return other


MISMATCHES = {
    # case: (edit the setup, what the one error line must say)
    "other-bundle": ("built from another bundle", "same graphs, other manifest"),
    "other-graph": ("built from another bundle", "graphs that differ: decoder_expert1.onnx"),
    "other-tensorrt": ("built by TensorRT 10.3.0, this machine has TensorRT 10.4.1",),
    "other-gpu": ("built for NVIDIA H200 (compute capability 9.0), this GPU is Orin (compute capability 8.7)",),
    "edited-engine": ("decoder_expert1.engine fails its sha256 check",),
    "missing-engine": ("engine decoder_expert2.engine of decoder_expert2.onnx is missing",),
    "no-record": ("no engines.json",),
    "path-outside": ("not a path inside the folder",),
    "link-outside": ("links outside the engines folder",),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_engines_of_another_bundle_tensorrt_or_gpu_are_refused(case, tiny_bundle, samples, tmp_path, monkeypatch):
    install(monkeypatch, "10.3.0", FakeGpu("NVIDIA H200", (9, 0)))
    engines = _build(tiny_bundle, tmp_path / "e")
    bundle = tiny_bundle
    if case == "other-bundle":
        bundle = _other_bundle(tiny_bundle, tmp_path)
    elif case == "other-graph":
        _edit_json(engines / "engines.json", lambda r: r["bundle"]["graphs"].update({"decoder_expert1.onnx": "0" * 64}))
    elif case == "other-tensorrt":
        install(monkeypatch, "10.4.1", FakeGpu("NVIDIA H200", (9, 0)))
    elif case == "other-gpu":
        install(monkeypatch, "10.3.0", FakeGpu("Orin", (8, 7)))
    elif case == "edited-engine":
        with open(engines / "decoder_expert1.engine", "r+b") as f:
            data = f.read()
            f.seek(0)
            f.write(data.replace(b"decoder", b"Decoder", 1))  # same size, other bytes
    elif case == "missing-engine":
        (engines / "decoder_expert2.engine").unlink()
    elif case == "no-record":
        (engines / "engines.json").unlink()
    elif case == "path-outside":
        shutil.copy(engines / "vision.engine", tmp_path / "vision.engine")
        _edit_json(engines / "engines.json", lambda r: r["engines"]["vision.onnx"].update(file="../vision.engine"))
    elif case == "link-outside":
        shutil.move(engines / "vision.engine", tmp_path / "vision.engine")
        os.symlink(tmp_path / "vision.engine", engines / "vision.engine")
    res = run("run", bundle, "--engines", engines, "--image", samples / "dior_05863.png", "--prompt", "[CAP] Hi.",
              "--max-new-tokens", "2")  # fmt: skip
    assert res.exit_code == 2
    needles = MISMATCHES[case]
    if case not in ("path-outside", "link-outside"):
        needles = (*needles, f"rsedge build-engines {bundle} -o {engines}")
    assert_one_error_line(res, *needles)


def test_engines_checked_before_any_engine_loads(tiny_bundle, tmp_path, monkeypatch):
    """Pipeline.load itself refuses (no request needed), with a BundleError."""
    install(monkeypatch)
    engines = _build(tiny_bundle, tmp_path / "e")
    install(monkeypatch, "10.4.1")
    with pytest.raises(BundleError, match=r"built by TensorRT 10\.3\.0"):
        Pipeline.load(tiny_bundle, engines=engines)


# -- real TensorRT (a Jetson or GPU box with tensorrt and cupy or cuda-python) --------------------------------------


@pytest.mark.trt
def test_real_engines_answer_like_onnxruntime(tiny_bundle, samples, tmp_path):
    """Built and run by the real TensorRT: the same greedy tokens as the CPU backend, logits within FP32 kernels'
    rounding (engines built without FP16, so only kernel choice differs)."""
    from rsedge.runtime.trt_session import TRT_MISSING, TensorRTUnavailable, gpu_identity
    from tests.test_trt import _tensorrt_importable

    if not _tensorrt_importable():
        pytest.skip(TRT_MISSING)
    try:
        gpu_identity()
    except TensorRTUnavailable as e:  # tensorrt present, no CUDA binding for buffers
        pytest.skip(str(e))
    engines = tmp_path / "e"
    build_bundle(tiny_bundle, engines, fp16=False, workspace_gb=1.0, **LIMITS)
    cpu = Pipeline.load(tiny_bundle)
    pipe = Pipeline.load(tiny_bundle, engines=engines)
    for paths, prompt in REQUESTS:
        want, got = _answer(cpu, samples, paths, prompt), _answer(pipe, samples, paths, prompt)
        assert got.tokens == want.tokens
        for a, b in zip(got.step_logits, want.step_logits, strict=True):
            np.testing.assert_allclose(a, b, atol=2e-3, rtol=2e-3)


def test_a_static_int8_vision_graph_is_built_with_the_int8_flag(tiny_checkpoint, tmp_path, monkeypatch):
    """Every JetPack target's INT8 / INT4 bundle has a static INT8 vision graph: its explicit INT8 Q/DQ needs the INT8
    builder flag (refused without it), whatever form the decoders' weights take."""
    from rsedge.export.bundle import export_bundle

    export_bundle(tiny_checkpoint, tmp_path / "b", precision="int4", block_size=64, form="qdq", vision="int8",
                  validate=False)  # fmt: skip
    install(monkeypatch)  # after the export: onnxruntime's quantizer looks for a real tensorrt module
    record = json.loads((_build(tmp_path / "b", tmp_path / "e") / "engines.json").read_text())
    assert record["engines"]["vision_int8.onnx"]["precision"] == {"fp16": True, "int8": True, "strongly_typed": False}
    assert record["engines"]["decoder_expert0.onnx"]["precision"]["strongly_typed"]
