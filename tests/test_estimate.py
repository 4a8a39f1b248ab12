"""`rsedge estimate`: the memory terms of a real tiny bundle computed by hand, the target table, the refusals, and
the full-size arithmetic (Qwen2-0.5B + SigLIP-so400m dims) against figures derived independently: the H200
check's own roofline bytes, the H200 measurements scaled by peak ratios, the published SigLIP time."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from rsedge.bench import estimate as est
from tests.test_bad_input import assert_one_error_line, run

ROOT = Path(__file__).resolve().parents[1]
H200_JSON = ROOT / "docs" / "gpu" / "gpu_check-h200-2026-11-30.json"
TARGETS = ("orin-nano-8gb", "orin-nano-super", "orin-nx-16gb", "agx-orin-64gb")
# The H200 int4 bundle's GPU memory beyond weights, KV and activations, and its process's peak RSS, derived
# in test_runtime_overhead_from_the_h200_run below from the measurement file with literal arithmetic.
GPU_RUNTIME = 1_359_980_307
HOST_PROCESS = 1_091_600_000


@pytest.fixture(scope="module")
def tiny_int4(tiny_checkpoint, tmp_path_factory) -> Path:
    from rsedge.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("estimate") / "int4"
    export_bundle(tiny_checkpoint, out, precision="int4", validate=False)
    return out


def _terms(result: dict) -> dict[str, int]:
    return {t["term"]: t["value"] for t in result["memory"]["terms"]}


# -- a real tiny bundle, by hand ----------------------------------------------------------------------------


def test_tiny_bundle_memory_terms_by_hand(tiny_int4, tmp_path):
    out = tmp_path / "e.json"
    res = run("estimate", tiny_int4, "--target", "orin-nano-8gb", "--context", "100", "--experts", "0,2", "--json", out)
    assert res.exit_code == 0, res.output
    assert "memory on Jetson Orin Nano 8GB" in res.output and "decode at depth 100" in res.output
    r = json.loads(out.read_text())
    size = {p.name: p.stat().st_size for p in tiny_int4.iterdir() if p.is_file()}
    # tiny config: text hidden 64, intermediate 128, 2 layers, 4 heads, 2 kv heads (head_dim 16), vocab 640;
    # vision hidden 48, intermediate 96, 2 layers, 4 heads, patch 8, 64 px (64 tokens); compute fp32.
    arrays = 64 * 4 + 640 * 64 * 1 + 640 * 4  # image_newline fp32, int8 embedding rows, fp32 row scales
    terms = _terms(r)
    assert terms["weights: vision graph (vision.onnx, vision.bin)"] == size["vision.onnx"] + size["vision.bin"]
    for e in (0, 2):
        name = f"weights: expert {e} (decoder_expert{e}.onnx, decoder_expert{e}.bin)"
        assert terms[name] == size[f"decoder_expert{e}.onnx"] + size[f"decoder_expert{e}.bin"]
    assert not any("expert 1" in t for t in terms)  # not loaded
    assert terms["weights: decoder_shared.bin (read by 2 graphs, loaded once)"] == size["decoder_shared.bin"] - arrays
    assert terms["memory-mapped arrays (image_newline, embed_tokens, embed_scales)"] == arrays
    assert terms["KV cache (100 positions)"] == 1 * 2 * 2 * 2 * 16 * 100 * 4 == 51_200  # one shared buffer
    # attention block 64 x 5 x 48 + scores 2 x 4 x 64^2 beats the MLP 64 x (96 + 288); + pixels + features
    assert terms["activations: vision, one image"] == (15_360 + 32_768 + 3 * 64 * 64 + 64 * 64) * 4 == 258_048
    assert terms["activations: prefill of 100 tokens x 2 expert session(s)"] == 2 * (100 * (128 + 512) + 640) * 4
    assert terms["runtime: CUDA context, cuBLAS/cuDNN, onnxruntime arenas"] == GPU_RUNTIME
    assert terms["runtime: host process (shares Orin's DRAM)"] == HOST_PROCESS
    assert r["memory"]["total"]["value"] == sum(terms.values())
    assert r["memory"]["usable"]["value"] == 5_200_000_000
    assert r["memory"]["headroom"]["value"] == 5_200_000_000 - sum(terms.values())
    assert r["memory"]["fits"] is True
    # Decode reads one expert's weights and the shared ones (not the mapped table) plus the KV at depth 100.
    step = size["decoder_expert0.bin"] + size["decoder_shared.bin"] - arrays + 51_200
    assert r["speed"]["decode"]["bytes_per_token"]["value"] == step
    assert r["experts"] == [0, 2]
    for q in (r["memory"]["total"], r["speed"]["decode"]["ms"], r["speed"]["prefill"]["tokens_per_s"]):
        assert q["unit"] and q["source"] in r["sources"]


def test_node_counts_match_onnx(tiny_int4):
    facts = est.read_bundle(tiny_int4)
    for key, rel in (("vision", "vision.onnx"), ("expert1", "decoder_expert1.onnx")):
        assert facts.nodes[key] == len(onnx.load(str(tiny_int4 / rel), load_external_data=False).graph.node)
    assert facts.graph_files["expert1"] == ["decoder_expert1.onnx", "decoder_expert1.bin", "decoder_shared.bin"]


def test_a_tied_unquantized_head_reads_the_table_as_a_weight(tmp_path):
    from rsedge.export.bundle import export_bundle
    from rsedge.models.rsunivlm.checkpoint import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "tied", size="tiny", seed=0, tied=True)
    export_bundle(ckpt, tmp_path / "b", precision="fp32", validate=False)
    r = est.estimate(est.read_bundle(tmp_path / "b"), "agx-orin-64gb", context=10, experts=["0"])
    shared = (tmp_path / "b" / "decoder_shared.bin").stat().st_size
    expert = (tmp_path / "b" / "decoder_expert0.bin").stat().st_size
    # Only the image newline is host-only: the fp32 table is the head's weight, read every step.
    assert r["speed"]["decode"]["bytes_per_token"]["value"] == shared - 64 * 4 + expert + 2 * 2 * 2 * 2 * 16 * 10 * 4
    assert _terms(r)["memory-mapped arrays (image_newline)"] == 64 * 4
    # the standard attention form of an fp32 export materializes its scores and softmax: 2 x 4 heads x 10^2
    assert (
        _terms(r)["activations: prefill of 10 tokens x 1 expert session(s)"]
        == (10 * (2 * 64 + 4 * 128) + 640 + 2 * 4 * 10 * 10) * 4
    )
    assert _terms(r)["KV cache (10 positions)"] == 2 * 2 * 2 * 2 * 16 * 10 * 4  # ping-pong: two buffers


# -- the target table and the refusals ---------------------------------------------------------------------------


def test_target_table_covers_the_four_modules():
    facts = est.load_facts()
    assert tuple(facts["targets"]) == TARGETS
    expected = {  # edge-target notes section 3: bandwidth GB/s, memory GB, GPU sparse INT8 TOPS
        "orin-nano-8gb": (68, 8, 40),
        "orin-nano-super": (102, 8, 67),
        "orin-nx-16gb": (102.4, 16, 60.0),
        "agx-orin-64gb": (204.8, 64, 170),
    }
    for name, t in facts["targets"].items():
        assert (t["bandwidth_gb_s"], t["memory_gb"], t["gpu_int8_tops_sparse"]) == expected[name]
        assert t["usable_gb"] < t["memory_gb"] and t["unified_memory"] is True
        for field in ("memory_gb", "usable_gb", "bandwidth_gb_s", "gpu_int8_tops_sparse", "gpu_clock_mhz"):
            assert t["sources"][field] in facts["sources"], (name, field)
        # GPU TOPS scale with tensor cores x clock from AGX Orin's GPU (170 at 64 cores, 1300 MHz): the Nano's
        # published 40 and 67 check the rule that gives the NX its GPU-only figure.
        assert t["gpu_int8_tops_sparse"] == pytest.approx(
            170 * t["tensor_cores"] / 64 * t["gpu_clock_mhz"] / 1300, rel=0.03
        )
    for p in facts["published"]:
        assert p["target"] in TARGETS and p["source"] in facts["sources"]


def test_facts_copied_from_the_h200_measurement():
    if not H200_JSON.is_file():
        pytest.skip("docs/gpu measurement not in this checkout")
    j = json.loads(H200_JSON.read_text())
    h = est.load_facts()["h200"]
    assert h["copy_bandwidth_bytes_per_s"] == j["bandwidth"]["bytes_per_s"]
    for name, b in h["bundles"].items():
        bench = j[f"full_bench_{name}"]
        assert (b["vision_ms"], b["prefill_ms"], b["decode_ms"]) == (
            bench["vision_ms"],
            bench["prefill_ms"],
            bench["decode_ms_median"],
        )
        assert (b["gpu_memory_used_mb"], b["rss_peak_mb"]) == (bench["gpu_memory_used_mb"], bench["rss_peak_mb"])
        assert h["prompt_tokens"] == bench["prompt_tokens"] and h["new_tokens"] == bench["new_tokens"]
        files = j["full_export"][name]["bytes"]
        assert b["bytes"] == {
            "vision.bin": files["vision.bin"],
            "vision.onnx": files["vision.onnx"],
            "decoder_shared.bin": files["decoder_shared.bin"],
            "decoder_expert.bin": files["decoder_expert0.bin"],
            "decoder_expert.onnx": files["decoder_expert0.onnx"],
        }


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--target", "orin-nano-4gb"), "unknown target 'orin-nano-4gb'"),
        (("--target", "agx-orin-64gb", "--experts", "3"), "'3' is not an expert"),
        (("--target", "agx-orin-64gb", "--context", "0"), "--context must be between"),
    ],
)
def test_bad_options_are_one_error_line(tiny_int4, args, needle):
    res = run("estimate", tiny_int4, *args)
    assert res.exit_code == 2
    assert_one_error_line(res, needle)


def test_a_folder_that_is_not_a_bundle_is_one_error_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for path, needle in ((tmp_path / "empty", "not a bundle"), (tmp_path / "missing", "no such bundle folder")):
        res = run("estimate", path, "--target", "orin-nano-8gb")
        assert res.exit_code == 2
        assert_one_error_line(res, needle)


# -- full-size arithmetic ----------------------------------------------------------------------------------------

# The H200 INT4 bundle's files (docs/gpu: full_export.int4), in the shared-buffer attention form.
FULL_FILES = {
    "vision.onnx": 355_838,
    "vision.bin": 799_368_960,
    "decoder_shared.bin": 230_897_152,
    **{f"decoder_expert{e}.onnx": 120_111 for e in range(3)},
    **{f"decoder_expert{e}.bin": 161_905_152 for e in range(3)},
    "tokenizer/tokenizer.json": 38_469,
}


def full_manifest(attention: str = "gqa-shared") -> dict:
    """A manifest with Qwen2-0.5B's decoder (24 layers, hidden 896, 14 heads, 2 kv heads, vocab 151936) and
    SigLIP-so400m at 384 px less its last layer (26 of 27), written by hand."""
    io = [{"name": "inputs_embeds", "shape": [1, "s", 896], "dtype": "float16"}]
    return {
        "precision": "int4",
        "compute_dtype": "fp16",
        "quantization": {"decoder": {"form": "ort", "bits": 4}, "embeddings": "int8-rows"},
        "model": {
            "text": {
                "vocab_size": 151936,
                "hidden_size": 896,
                "intermediate_size": 4864,
                "num_hidden_layers": 24,
                "num_attention_heads": 14,
                "num_key_value_heads": 2,
                "tie_word_embeddings": False,
            },
            "vision": {
                "hidden_size": 1152,
                "intermediate_size": 4304,
                "num_hidden_layers": 27 - 1,
                "num_attention_heads": 16,
                "patch_size": 14,
                "image_size": 384,
                "num_channels": 3,
            },
        },
        "arrays": {
            "image_newline": {"file": "decoder_shared.bin", "offset": 0, "shape": [896], "dtype": "float16"},
            "embed_tokens": {"file": "decoder_shared.bin", "offset": 1792, "shape": [151936, 896], "dtype": "int8"},
            "embed_scales": {"file": "decoder_shared.bin", "offset": 136136448, "shape": [151936], "dtype": "float32"},
        },
        "graphs": {
            "vision": {"file": "vision.onnx", "inputs": [{"name": "pixel_values", "dtype": "float16"}]},
            "decoder": {
                "attention": attention,
                "max_positions": 8192,
                "experts": {
                    str(e): {
                        "file": f"decoder_expert{e}.onnx",
                        "inputs": io,
                        "outputs": [{"name": "logits", "dtype": "float32"}],
                    }
                    for e in range(3)
                },
            },
        },
        "files": {k: {"bytes": v, "sha256": "0" * 64} for k, v in FULL_FILES.items()},
    }


NODES = {"vision": 1469, "expert0": 292, "expert1": 292, "expert2": 292}  # the H200 graphs' node counts


def full(target: str, context: int, attention: str = "gqa-shared", experts=None) -> dict:
    return est.estimate(est.manifest_facts(full_manifest(attention), NODES), target, context, experts)


def test_full_size_decode_bytes_equal_the_h200_roofline():
    """scripts/gpu_check.py computed the bytes one decode step reads at depth 765 on its own: 265,460,224."""
    if H200_JSON.is_file():
        assert json.loads(H200_JSON.read_text())["full_roofline_int4"]["bytes_per_token"] == 265_460_224
    r = full("orin-nano-8gb", 765)
    # less the image newline (896 fp16 values in decoder_shared.bin), which the runtime reads, not the graph;
    # the roofline subtracted only the embedding table and its scales
    assert r["speed"]["decode"]["bytes_per_token"]["value"] == 265_460_224 - 896 * 2
    # KV: 24 layers x (K + V) x 2 kv heads x 64 x fp16 = 12,288 bytes per position (the roofline's 9,400,320 at 765)
    assert _terms(r)["KV cache (765 positions)"] == 12_288 * 765 == 9_400_320
    # the past/present forms hold two buffers and read the past while writing the present
    r2 = full("orin-nano-8gb", 765, attention="gqa")
    assert _terms(r2)["KV cache (765 positions)"] == 2 * 9_400_320
    assert r2["speed"]["decode"]["bytes_per_token"]["value"] == 265_460_224 - 896 * 2 + 9_400_320


def test_full_size_decode_bound_per_module():
    # Nano 8GB: 265.46 MB / (68 GB/s x 0.5) = 7.808 ms, above the launch floor: bandwidth-bound, 128 tok/s.
    d = full("orin-nano-8gb", 765)["speed"]["decode"]
    assert d["bound"] == "bandwidth"
    assert d["ms"]["value"] == pytest.approx(265_460_224 / 34e9 * 1e3, rel=1e-5)
    assert d["tokens_per_s"]["value"] == pytest.approx(128.08, abs=0.01)
    # AGX Orin: 2.59 ms of bandwidth is under the launch floor of a 292-node graph, which the fit puts at the
    # H200 INT4 decode itself (3.165 ms): launch-bound.
    d = full("agx-orin-64gb", 765)["speed"]["decode"]
    assert d["floors"]["bandwidth"]["value"] == pytest.approx(265_460_224 / 102.4e9 * 1e3, rel=1e-5)
    assert d["bound"] == "launch"
    assert d["ms"]["value"] == pytest.approx(3.165)
    assert d["roofline_tokens_per_s"]["value"] == pytest.approx(204.8e9 / 265_460_224, rel=1e-5)


def test_full_size_prefill_and_vision_scale_from_their_measurements():
    # The H200's prefill efficiency cancels: a 765-token INT4 prefill on AGX Orin takes the H200's 4.905 ms x
    # 989.5 / 42.5 (dense FP16 TFLOPS: the H200 datasheet, and 170 sparse INT8 TOPS / 4).
    p = full("agx-orin-64gb", 765)["speed"]["prefill"]
    assert p["bound"] == "compute"
    assert p["ms"]["value"] == pytest.approx(4.905 * 989.5 / 42.5)
    assert p["tokens_per_s"]["value"] == pytest.approx(765 / (4.905 * 989.5 / 42.5) * 1e3)
    # Qwen2-0.5B: 0.358 G weights a token multiplies (0.49 B parameters less the 136 M embedding table).
    per_layer = 896 * (896 + 128 + 128) + 896 * 896 + 3 * 896 * 4864
    assert 24 * per_layer == 357_826_560
    assert p["flops"]["value"] == 2 * 765 * 357_826_560 + 24 * 4 * 896 * (765 * 766 // 2) + 2 * 896 * 151936
    # Vision: the published SigLIP-So400m FP16 time on AGX Orin (27 layers, no connector, 98.5 ms) scaled by FLOPs.
    D, inter, T = 1152, 4304, 729
    layer = T * 2 * (4 * D * D + 2 * D * inter) + 2 * 2 * T * T * D
    patch = 2 * T * 3 * 14 * 14 * D
    ours = patch + 26 * layer + 2 * T * (D * 896 + 896 * 896)
    published = patch + 27 * layer
    v = full("agx-orin-64gb", 765)["speed"]["vision"]
    assert v["flops"]["value"] == ours
    assert v["bound"] == "compute"
    assert v["ms"]["value"] == pytest.approx(98.5 * ours / published)
    # Orin NX 16GB: the same work at 60 instead of 170 GPU TOPS; the published NX figure is 311.9 ms.
    nx = full("orin-nx-16gb", 765)["speed"]["vision"]["ms"]["value"]
    assert nx == pytest.approx(98.5 * ours / published * 170 / 60)
    check = next(p for p in full("orin-nx-16gb", 765)["published"] if p["id"] == "nx-siglip")
    assert check["predicted"]["value"] == pytest.approx(98.5 * 170 / 60)
    assert 0.8 < check["ratio"]["value"] < 1.0  # 279 ms predicted, 311.9 published


def test_full_size_memory_on_the_nano():
    r = full("orin-nano-8gb", 1024)
    t = _terms(r)
    assert t["weights: vision graph (vision.onnx, vision.bin)"] == 355_838 + 799_368_960
    assert t["weights: decoder_shared.bin (read by 3 graphs, loaded once)"] == 230_897_152 - (
        896 * 2 + 151936 * 896 + 151936 * 4
    )
    assert t["memory-mapped arrays (image_newline, embed_tokens, embed_scales)"] == 136_744_192
    assert t["KV cache (1024 positions)"] == 12_288 * 1024
    assert t["activations: prefill of 1024 tokens x 3 expert session(s)"] == 3 * (
        1024 * (2 * 896 + 4 * 4864) * 2 + 151936 * 4
    )
    weights = 355_838 + 799_368_960 + 3 * (120_111 + 161_905_152) + 230_897_152
    hand = weights + 12_288 * 1024 + 44_601_408 + 3 * 44_123_648 + GPU_RUNTIME + HOST_PROCESS
    assert r["memory"]["total"]["value"] == hand
    assert r["memory"]["fits"] is True and r["memory"]["fits_docker"] is False  # 4.16 GB: 5.2 free, 3.7 in Docker
    # One expert for a mission: two expert files and two prefill arenas fewer.
    one = full("orin-nano-8gb", 1024, experts=["1"])["memory"]["total"]["value"]
    assert hand - one == 2 * (120_111 + 161_905_152) + 2 * 44_123_648


def test_runtime_overhead_from_the_h200_run():
    """The runtime terms: the H200 INT4 bench process's GPU memory less its weights, KV and activations."""
    weights = 799_368_960 + 355_838 + 230_897_152 + 161_905_152 + 120_111 - 136_744_192  # vision + expert 1
    kv = 2 * 12_288 * (765 + 64 + 1)  # past/present buffers at the bench's capacity
    act = 765 * 2 * (2 * 896 + 4 * 4864) + 151936 * 4 + 44_601_408
    assert 2514.0e6 - weights - kv - act == GPU_RUNTIME
    cal = est.calibrate(est.load_facts())
    assert cal.gpu_runtime_bytes == GPU_RUNTIME and cal.host_process_bytes == HOST_PROCESS
    # launch fit: two H200 decode runs, 292 and 1594 nodes
    assert cal.node_ms == pytest.approx((7.407 - 3.165) / (1594 - 292))
    # the fit predicts the third graph the H200 ran, the 1469-node vision tower, within 3 % of its 7.142 ms
    assert cal.run_ms + 1469 * cal.node_ms == pytest.approx(7.142, rel=0.03)


def test_every_reported_number_has_a_unit_and_a_known_source():
    r = full("orin-nano-super", 2048)

    def walk(node):
        if isinstance(node, dict):
            if "value" in node and "unit" in node:
                yield node
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    found = list(walk({k: v for k, v in r.items() if k != "sources"}))
    assert len(found) > 30
    for q in found:
        assert q["unit"] and q["source"] in r["sources"], q


def test_the_h200_run_is_reproduced_from_its_own_facts():
    """Calibration round trip: the H200 as a target, its INT4 bundle's shape (past/present attention, 292 and
    1469 nodes): prefill and decode come back as measured, vision (not fitted) within 3 %, and the GPU-side
    memory terms add up to the 2,514 MB NVML saw (the KV at the bench's 830-position capacity)."""
    facts = est.load_facts()
    facts["targets"]["h200"] = {
        "name": "H200",
        "unified_memory": False,
        "memory_gb": 141,
        "usable_gb": 141,
        "bandwidth_gb_s": facts["h200"]["copy_bandwidth_bytes_per_s"] / 1e9,
        "gpu_int8_tops_sparse": 989.5 * 4,
        "cuda_cores": 16896,
        "tensor_cores": 528,
        "gpu_clock_mhz": 1980,
        "sources": {k: "h200-check" for k in ("usable_gb", "bandwidth_gb_s", "gpu_int8_tops_sparse")},
    }
    r = est.estimate(est.manifest_facts(full_manifest("gqa"), NODES), "h200", 765, ["1"], facts)
    s = r["speed"]
    assert s["prefill"]["bound"] == "compute" and s["prefill"]["ms"]["value"] == pytest.approx(4.905)
    assert s["decode"]["bound"] == "launch" and s["decode"]["ms"]["value"] == pytest.approx(3.165)
    assert s["vision"]["bound"] == "launch" and s["vision"]["ms"]["value"] == pytest.approx(7.142, rel=0.03)
    t = _terms(est.estimate(est.manifest_facts(full_manifest("gqa"), NODES), "h200", 830, ["1"], facts))
    gpu = sum(v for k, v in t.items() if "host" not in k and "memory-mapped" not in k)
    prefill_830_vs_765 = 2 * (830 - 765) * (2 * 896 + 4 * 4864)  # the terms took the prefill at 830 tokens
    assert gpu - prefill_830_vs_765 == pytest.approx(2514.0e6, abs=1)
