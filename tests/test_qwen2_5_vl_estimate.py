"""`rsedge estimate` on a Qwen2.5-VL bundle (INT4, INT8 vision): the dynamic-resolution vision graph costed on a stated
image (smart_resize -> patches -> visual tokens), its window and full attention, frame mask and merger computed by
hand for the tiny bundle; the full-size image arithmetic; the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsedge.bench import vision_cost as vc
from rsedge.errors import OptionError
from rsedge.export.bundle import export_bundle
from rsedge.models.qwen2_5_vl.vision import HEADS_PER_PASS
from tests.qwen2_5_vl_helpers import tiny_checkpoint
from tests.test_bad_input import assert_one_error_line, run

# Qwen2.5-VL-3B's vision record and preprocessor (rsedge.models.qwen2_5_vl.checkpoint SIZES["full"])
FULL_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_channels": 3,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "out_hidden_size": 2048,
}
FULL_PREPROCESS = {"kind": "qwen2_vl_dynamic", "min_pixels": 3136, "max_pixels": 12845056}


@pytest.fixture(scope="module")
def int4_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qwen-estimate")
    out = root / "int4"
    export_bundle(tiny_checkpoint(root), out, precision="int4", vision="int8", validate=False)
    return out


def _terms(result: dict) -> dict[str, int]:
    return {t["term"]: t["value"] for t in result["memory"]["terms"]}


def test_tiny_bundle_memory_and_vision_by_hand(int4_bundle, tmp_path):
    out = tmp_path / "e.json"
    res = run("estimate", int4_bundle, "--target", "orin-nano-8gb", "--context", "300", "--json", out)
    assert res.exit_code == 0, res.output
    assert "vision, one 1024x1024 image, 256 visual tokens" in res.output and "memory on Jetson Orin Nano" in res.output
    r = json.loads(out.read_text())
    # 1024x1024 within the tiny max_pixels 448^2: smart_resize -> 448x448, 32 x 32 patches of 14 px, 256 tokens
    assert r["image"] == {**r["image"], "kind": "dynamic", "size": [1024, 1024], "resized_hw": [448, 448],
                          "patches": 1024, "tokens": 256}  # fmt: skip
    terms = _terms(r)
    # tiny vision: 4 blocks (full attention at 1 and 3), width 32, FFN 64, 2 heads, out 64; 112 px windows = 4 x 4
    # merge units = 64 patches, 16 windows; the graph's input is float32 (INT8 Q/DQ weights).
    rows = 1024 * 5 * 32 * 4
    full = rows + 2 * 2 * 1024**2 * 4  # 2 heads a pass, float32 scores and softmax
    windowed = rows + 2 * 2 * 16 * 64**2 * 4
    mlp = 1024 * (2 * 32 + 3 * 64) * 4
    mask = 1024**2 * 4
    io = 1024 * 1176 * 4 + 256 * 64 * 4
    assert max(full, windowed, mlp) == full
    assert terms["activations: vision, one 1024x1024 image (256 visual tokens)"] == full + mask + io == 26_509_312
    # tiny text: 2 layers, 2 kv heads, head dim 16, fp32, one shared KV buffer
    assert terms["KV cache (300 positions)"] == 1 * 2 * 2 * 2 * 16 * 300 * 4
    assert terms["activations: prefill of 300 tokens x 1 expert session(s)"] == (300 * (128 + 512) + 704) * 4
    size = {p.name: p.stat().st_size for p in int4_bundle.iterdir() if p.is_file()}
    vision_files = "weights: vision graph (vision_int8.onnx, vision_int8.onnx.data)"
    assert terms[vision_files] == size["vision_int8.onnx"] + size["vision_int8.onnx.data"]
    assert r["memory"]["total"]["value"] == sum(terms.values()) and r["memory"]["fits"] is True
    # FLOPs: patch embedding, 4 blocks' linears, 2 windowed + 2 full blocks' attention, the 2x2 merger
    flops = (
        2 * 1024 * 1176 * 32
        + 4 * 2 * 1024 * (4 * 32 * 32 + 3 * 32 * 64)
        + 2 * 4 * 16 * 64**2 * 32
        + 2 * 4 * 1024**2 * 32
        + 2 * 256 * (128 * 128 + 128 * 64)
    )
    assert r["speed"]["vision"]["flops"]["value"] == flops == 458_752_000
    assert not any(n.startswith("--context") for n in r["notes"])  # 300 tokens hold the image's 256


def test_image_size_option_and_a_short_context(int4_bundle, tmp_path):
    out = tmp_path / "e.json"
    res = run("estimate", int4_bundle, "--target", "agx-orin-64gb", "--context", "100", "--image-size", "280x140",
              "--json", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["image"]["resized_hw"] == [140, 280] and r["image"]["tokens"] == 10 * 20 // 4
    assert "--context 100 is shorter than one image's" not in " ".join(r["notes"])
    res = run("estimate", int4_bundle, "--target", "agx-orin-64gb", "--context", "100", "--json", out)
    assert "--context 100 is shorter than one image's 256 visual tokens" in json.loads(out.read_text())["notes"]


def test_full_size_image_arithmetic():
    """Qwen2.5-VL-3B on a 1024 px square: smart_resize to 1036 (37 merge blocks of 28 px), 74^2 = 5,476 patches,
    1,369 visual tokens; windows of 4 x 4 merge units over 37 x 37 -> 10 x 10 = 100 windows of at most 64 patches."""
    tower = vc.vision_cost({"preprocess": FULL_PREPROCESS, "vision": FULL_VISION})
    assert (tower.resized, tower.patches, tower.tokens) == ((1036, 1036), 5476, 1369)
    assert (tower.windows, tower.window_len, tower.full_blocks) == (100, 64, 4)
    act, _ = tower.activation_bytes(2048, 4)
    # full attention's float32 scores + softmax of 2 heads and the frame mask dominate: ~0.77 GB on an 8 GB module
    assert act == 5476 * 5 * 1280 * 4 + 2 * 2 * 5476**2 * 4 + 5476**2 * 4 + 5476 * 1176 * 4 + 1369 * 2048 * 4
    flops, _ = tower.flops(2048)
    linears = 32 * 2 * 5476 * (4 * 1280**2 + 3 * 1280 * 3420)  # 2 FLOPs x the blocks' 630 M weights x patches
    attention = 28 * 4 * 100 * 64**2 * 1280 + 4 * 4 * 5476**2 * 1280
    assert flops == 2 * 5476 * 1176 * 1280 + linears + attention + 2 * 1369 * (5120**2 + 5120 * 2048)
    assert 7.6e12 < flops < 7.8e12 and linears / flops > 0.89  # the linears dominate even at 5,476 patches


def test_the_heads_per_pass_are_the_vision_graphs():
    assert vc.FULL_ATTENTION_HEADS_PER_PASS == HEADS_PER_PASS


def test_refusals():
    square = {"preprocess": {"kind": "square"}, "model": {"vision": {"num_hidden_layers": 2, "hidden_size": 48,
              "intermediate_size": 96, "num_attention_heads": 4, "patch_size": 8, "image_size": 64}}}  # fmt: skip
    assert vc.vision_cost(square).tokens == 64
    with pytest.raises(OptionError, match="dynamic-resolution bundles"):
        vc.vision_cost(square, (512, 512))
    for bad in ("1024", "0x10", "axb", "10x10x10"):
        with pytest.raises(OptionError, match="WIDTHxHEIGHT"):
            vc.parse_image_size(bad)


def test_a_bad_image_size_is_one_error_line(int4_bundle):
    assert_one_error_line(
        run("estimate", int4_bundle, "--target", "orin-nano-8gb", "--image-size", "1024"), "--image-size"
    )
