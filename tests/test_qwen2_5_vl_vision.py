"""Qwen2.5-VL's vision side against transformers (the oracle; written against transformers 5.24.0).

- preprocessing (numpy + Pillow) equals ``Qwen2VLImageProcessorPil`` bit for bit on real remote-sensing photos
  cut to five shapes (square, wide, tall, below min_pixels, above max_pixels), and ``smart_resize`` equals
  upstream's on a table of sizes;
- the grid feeds (window permutation, cu_window_seqlens) equal transformers' ``get_vision_window_index``;
- an aspect ratio over 200 is one ImageError line;
- the ONNX vision graph (onnxruntime, on the runtime's numpy feeds) equals ``model.visual(pixel_values,
  grid_thw)`` of a tiny random Qwen2.5-VL (depth 4, full attention at blocks 1 and 3, 56 px windows) on those
  five shapes: FP32 within 1e-4, FP16 within 2e-2; two images at once too; dropping the windows or the rotary
  breaks it (the comparison can fail);
- checkpoint layouts (``model.visual.``, ``visual.``, bare) and one-line errors for a bad tensor;
- static INT8 within the project's ``vision-int8`` bound; the TensorRT parser check passes.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rsedge.demo import SAMPLES
from rsedge.errors import BundleError, ImageError
from rsedge.runtime.families.qwen2_5_vl_image import (
    FEED_NAMES,
    FRAME_SEGMENTS,
    PIXEL_VALUES,
    REVERSE_INDEX,
    WINDOW_INDEX,
    WINDOW_MASK,
    WINDOW_ROWS,
    WINDOW_SLOTS,
    VisionPreprocess,
    image_feeds,
    preprocess,
    smart_resize,
    vision_feeds,
    window_index,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (  # noqa: E402
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (  # noqa: E402
    smart_resize as hf_smart_resize,
)
from transformers.vision_utils import get_vision_window_index  # noqa: E402

# Small pixel budget: 196 to 256 patches an image keeps the graphs' attention tiny.
PRE = VisionPreprocess(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
VISION = {"spatial_merge_size": 2, "patch_size": 14, "hidden_size": 64, "num_heads": 4, "window_size": 56}


def _sample(name: str) -> Image.Image:
    with Image.open(SAMPLES / name) as im:
        return im.convert("RGB")


def shapes() -> dict[str, Image.Image]:
    """Real RS photos (DIOR 512x512, DOTA 451x839, AID 150x150) cut to the five cases."""
    dior, dota, aid = _sample("dior_05863.png"), _sample("dota_P0075.png"), _sample("aid_storagetanks_207.jpg")
    return {
        "square": dior.crop((100, 100, 300, 300)),  # 200x200 -> 196x196, inside the budget
        "wide": dior.crop((0, 300, 512, 390)),  # 512x90
        "tall": dota.crop((200, 0, 320, 451)),  # 120x451
        "small": aid.resize((40, 40), Image.BICUBIC),  # 1,600 px < min_pixels: scaled up
        "large": dota,  # 378,389 px > max_pixels: scaled down
    }


@pytest.mark.parametrize("case", ["square", "wide", "tall", "small", "large"])
def test_preprocess_equals_transformers_processor(case: str) -> None:
    image = shapes()[case]
    hf = Qwen2VLImageProcessorPil(min_pixels=PRE.min_pixels, max_pixels=PRE.max_pixels)
    want = hf(images=[image], return_tensors="np")
    pixel_values, grid_thw, (h, w) = preprocess(image, PRE)
    feeds, grid_again, resized = image_feeds(image, PRE, VISION, np.float16)
    assert feeds[PIXEL_VALUES].dtype == np.float16 and np.array_equal(grid_again, grid_thw) and resized == (h, w)
    assert set(feeds) == {PIXEL_VALUES, *FEED_NAMES}
    assert pixel_values.dtype == np.float32 and grid_thw.dtype == np.int64
    np.testing.assert_array_equal(grid_thw, want["image_grid_thw"])
    assert pixel_values.shape == want["pixel_values"].shape
    # Same Pillow resize of the same 8-bit pixels, same float operation order: identical, not merely close.
    np.testing.assert_array_equal(pixel_values, want["pixel_values"])
    assert (h // PRE.patch_size, w // PRE.patch_size) == tuple(grid_thw[0, 1:])
    n = int(np.prod(grid_thw))
    if case == "small":
        assert h * w >= PRE.min_pixels and n == 16
    if case == "large":
        assert h * w <= PRE.max_pixels and image.width * image.height > PRE.max_pixels


def test_auto_image_processor_is_the_pil_one_here(tmp_path) -> None:
    """What a Qwen2.5-VL checkpoint's preprocessor_config.json loads in this environment (no torchvision: the
    PIL backend, which the parity above is against)."""
    from transformers import AutoImageProcessor

    Qwen2VLImageProcessorPil(min_pixels=PRE.min_pixels, max_pixels=PRE.max_pixels).save_pretrained(tmp_path)
    proc = AutoImageProcessor.from_pretrained(tmp_path)
    image = shapes()["wide"]
    want = proc(images=[image], return_tensors="np")["pixel_values"]
    got = preprocess(image, PRE)[0]
    if isinstance(proc, Qwen2VLImageProcessorPil):
        np.testing.assert_array_equal(got, want)
    else:  # torchvision present: its bicubic resize is torch's, not Pillow's; a few 8-bit levels apart
        assert got.shape == want.shape and np.abs(got - want).max() < 0.15


SIZES = [
    (1, 1),
    (1, 200),
    (28, 28),
    (27, 29),
    (55, 57),
    (100, 100),
    (224, 224),
    (256, 1024),
    (451, 839),
    (512, 512),
    (1080, 1920),
    (3000, 4000),
    (10000, 50),
    (14, 2800),
    (4321, 1234),
]


@pytest.mark.parametrize("budget", [(56 * 56, 28 * 28 * 1280), (56 * 56, 28 * 28 * 64), (100 * 100, 300 * 300)])
def test_smart_resize_equals_transformers(budget: tuple[int, int]) -> None:
    lo, hi = budget
    for h, w in SIZES:
        for factor in (28, 32):
            assert smart_resize(h, w, factor, lo, hi) == hf_smart_resize(h, w, factor, lo, hi), (h, w, factor)


def test_extreme_aspect_ratio_is_one_image_error() -> None:
    with pytest.raises(ValueError):  # upstream refuses it too
        hf_smart_resize(10, 2010)
    with pytest.raises(ImageError) as e:
        smart_resize(10, 2010)
    assert "\n" not in str(e.value) and "aspect ratio 201.0 exceeds 200" in str(e.value)
    with pytest.raises(ImageError):
        preprocess(Image.new("RGB", (2010, 10)), PRE)
    smart_resize(10, 2000)  # exactly 200 is taken


def test_preprocess_from_the_checkpoints_preprocessor_config(tmp_path) -> None:
    """What transformers saves (size {shortest_edge, longest_edge}, PIL filter code 3) and the released
    Qwen2.5-VL file's spelling (min_pixels / max_pixels beside the other fields) read back as the processor."""
    import json

    Qwen2VLImageProcessorPil(min_pixels=PRE.min_pixels, max_pixels=PRE.max_pixels).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert "min_pixels" not in saved and saved["resample"] == 3  # this transformers writes size + a code
    assert VisionPreprocess.from_preprocessor_config(saved) == PRE
    released = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2}
    released |= {"merge_size": 2, "image_mean": list(PRE.image_mean), "image_std": list(PRE.image_std)}
    assert VisionPreprocess.from_preprocessor_config(released) == VisionPreprocess(max_pixels=12845056)
    with pytest.raises(BundleError, match="do_normalize"):
        VisionPreprocess.from_preprocessor_config({**saved, "do_normalize": False})


def test_preprocess_manifest_round_trip() -> None:
    assert VisionPreprocess.from_manifest(PRE.to_manifest()) == PRE
    assert VisionPreprocess.from_manifest({}) == VisionPreprocess()
    with pytest.raises(BundleError, match="min_pixels"):
        VisionPreprocess.from_manifest({"min_pixels": 10, "max_pixels": 5})
    with pytest.raises(BundleError, match="resample"):
        VisionPreprocess.from_manifest({"resample": "box-ish"})


@pytest.mark.parametrize("grid", [[[1, 14, 14]], [[1, 8, 12]], [[1, 4, 30]], [[1, 16, 16]], [[1, 8, 12], [2, 4, 6]]])
def test_window_index_equals_transformers(grid: list[list[int]]) -> None:
    want_index, want_cu = get_vision_window_index(torch.tensor(grid), 2, 56, 14)
    index, cu = window_index(np.array(grid), 2, 56, 14)
    np.testing.assert_array_equal(index, want_index.numpy())
    np.testing.assert_array_equal(cu, want_cu.numpy())
    feeds = vision_feeds(np.array(grid), VISION)
    np.testing.assert_array_equal(feeds[WINDOW_INDEX][feeds[REVERSE_INDEX]], np.arange(index.size))
    # the padded window table: window w holds exactly the patches cu[w]:cu[w+1], each patch one slot
    rows, mask, slots = feeds[WINDOW_ROWS], feeds[WINDOW_MASK], feeds[WINDOW_SLOTS]
    lengths = np.diff(cu)
    assert rows.shape == mask.shape == (lengths.size, lengths.max()) and slots.shape == (cu[-1],)
    real = mask == 0
    np.testing.assert_array_equal(real.sum(1), lengths)
    np.testing.assert_array_equal(rows[real], np.arange(cu[-1]))  # row-major over windows: patch order
    np.testing.assert_array_equal(rows.reshape(-1)[slots], np.arange(cu[-1]))
    assert (mask[~real] == np.finfo(np.float32).min).all()
    frames = sum(t for t, _, _ in grid)
    assert feeds[FRAME_SEGMENTS].max() == frames - 1


def test_vision_feeds_refuse_a_bad_record_or_grid() -> None:
    with pytest.raises(BundleError, match="window_size"):
        vision_feeds(np.array([[1, 4, 4]]), {**VISION, "window_size": 14})
    with pytest.raises(BundleError, match="num_heads"):
        vision_feeds(np.array([[1, 4, 4]]), {k: v for k, v in VISION.items() if k != "num_heads"})
    with pytest.raises(ImageError, match="merge blocks"):
        vision_feeds(np.array([[1, 5, 4]]), VISION)


# -- the vision graph ------------------------------------------------------------------------------------------

# Measured on this fixture (outputs up to ~3): FP32 graph vs torch FP32 <= 7.4e-6 (torch FP32 vs FP64 alike);
# FP16 graph (float16 weights and activations; RMSNorm, rotary and softmax in float32) <= 6.3e-3.
FP32_ATOL = 1e-4
FP16_ATOL = 2e-2
TINY_VISION = dict(
    depth=4,
    hidden_size=64,
    intermediate_size=96,
    num_heads=4,
    out_hidden_size=48,
    window_size=56,  # 2x2 merge units a window: 196 patches make 16 windows, ragged at two edges
    fullatt_block_indexes=[1, 3],
)


@pytest.fixture(scope="module")
def tiny_model():
    """A tiny random Qwen2.5-VL (transformers 5.24.0), weights scaled so activations are O(1) and attention is
    far from uniform: a wrong window or rotary shows up well above the tolerances."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]},
    )
    cfg = Qwen2_5_VLConfig(vision_config=TINY_VISION, text_config=text, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.model.visual.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.ndim == 1:  # RMSNorm weights
                p.normal_(1.0, 0.2)
            else:
                fan_in = p[0].numel()
                p.normal_(0.0, (1.5 if ".qkv." in name else 1.0) / fan_in**0.5)
    assert model.model.visual.config._attn_implementation == "eager"
    return model


@pytest.fixture(scope="module")
def vision_graphs(tiny_model, tmp_path_factory):
    """The FP32 and FP16 graphs of the tiny tower, written once, with their manifest records."""
    import onnxruntime as ort

    from rsedge.models.qwen2_5_vl.vision import build_vision_graph, vision_config_record

    record = vision_config_record(tiny_model.config.vision_config)
    out = tmp_path_factory.mktemp("qwen_vision")
    sessions = {}
    # FP32: full-attention blocks 2 heads a pass (the default); FP16: all 4 heads at once (both forms checked)
    for dtype, heads_per_pass in (("float32", 2), ("float16", None)):
        name = f"vision_{dtype}"
        graph = build_vision_graph(tiny_model.state_dict(), record, out, name, dtype, heads_per_pass=heads_per_pass)
        sessions[dtype] = ort.InferenceSession(str(out / graph["file"]), providers=["CPUExecutionProvider"])
        sessions[f"{dtype}_path"] = out / graph["file"]
    return record, sessions


def _reference(model, pixel_values: np.ndarray, grid_thw: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model.model.visual(torch.from_numpy(pixel_values), grid_thw=torch.from_numpy(grid_thw))
    return out.pooler_output.numpy()


def _run(session, record: dict, pixel_values: np.ndarray, grid_thw: np.ndarray, **override) -> np.ndarray:
    feeds = vision_feeds(grid_thw, record)
    fp16 = session.get_inputs()[0].type == "tensor(float16)"
    feeds[PIXEL_VALUES] = pixel_values.astype(np.float16 if fp16 else np.float32)
    feeds.update(override)
    return session.run(None, feeds)[0].astype(np.float32)


@pytest.mark.parametrize("case", ["square", "wide", "tall", "small", "large"])
def test_vision_graph_equals_transformers_visual(case: str, tiny_model, vision_graphs) -> None:
    """The graph on the runtime's feeds against ``model.visual(pixel_values, grid_thw)``, per image shape."""
    record, sessions = vision_graphs
    pixel_values, grid_thw, _ = preprocess(shapes()[case], PRE)
    want = _reference(tiny_model, pixel_values, grid_thw)
    assert want.shape == (int(np.prod(grid_thw)) // 4, TINY_VISION["out_hidden_size"])
    assert np.abs(want).max() > 1.0  # O(1) outputs: the absolute tolerances below mean something
    np.testing.assert_allclose(_run(sessions["float32"], record, pixel_values, grid_thw), want, rtol=0, atol=FP32_ATOL)
    np.testing.assert_allclose(_run(sessions["float16"], record, pixel_values, grid_thw), want, rtol=0, atol=FP16_ATOL)


def test_vision_graph_takes_two_images_at_once(tiny_model, vision_graphs) -> None:
    """Two images' rows and grids concatenated: each attends only within itself (frame segments)."""
    record, sessions = vision_graphs
    parts = [preprocess(shapes()[c], PRE) for c in ("wide", "small")]
    pixel_values = np.concatenate([p[0] for p in parts])
    grid_thw = np.concatenate([p[1] for p in parts])
    want = _reference(tiny_model, pixel_values, grid_thw)
    np.testing.assert_allclose(_run(sessions["float32"], record, pixel_values, grid_thw), want, rtol=0, atol=FP32_ATOL)


def test_windows_and_rotary_matter(tiny_model, vision_graphs) -> None:
    """The comparison above can fail: attending across windows, or dropping the rotary, moves the output far
    beyond the FP32 tolerance."""
    from rsedge.runtime.families.qwen2_5_vl_image import ROTARY_COS, ROTARY_SIN

    record, sessions = vision_graphs
    pixel_values, grid_thw, _ = preprocess(shapes()["square"], PRE)
    want = _reference(tiny_model, pixel_values, grid_thw)
    n = pixel_values.shape[0]
    one_window = {  # every patch in a single window: windowed blocks attend across windows
        WINDOW_ROWS: np.arange(n, dtype=np.int64)[None],
        WINDOW_MASK: np.zeros((1, n), np.float32),
        WINDOW_SLOTS: np.arange(n, dtype=np.int64),
    }
    no_windows = _run(sessions["float32"], record, pixel_values, grid_thw, **one_window)
    assert np.abs(no_windows - want).max() > 1000 * FP32_ATOL
    hd = TINY_VISION["hidden_size"] // TINY_VISION["num_heads"]
    identity = {ROTARY_COS: np.ones((n, hd), np.float32), ROTARY_SIN: np.zeros((n, hd), np.float32)}
    assert np.abs(_run(sessions["float32"], record, pixel_values, grid_thw, **identity) - want).max() > 1000 * FP32_ATOL


def test_checkpoint_layouts_and_strict_names(tiny_model, vision_graphs, tmp_path) -> None:
    """``model.visual.*`` (transformers 5), ``visual.*`` (older checkpoints) and a bare tower give the same
    graph; a missing, misshapen or unexpected tower tensor is one CheckpointError line naming it."""
    from rsedge.errors import CheckpointError
    from rsedge.models.qwen2_5_vl.vision import build_vision_graph, vision_tensors

    record, sessions = vision_graphs
    full = tiny_model.state_dict()
    tower = {k.removeprefix("model.visual."): v for k, v in full.items() if k.startswith("model.visual.")}
    older = {f"visual.{k}": v for k, v in tower.items()}
    assert vision_tensors(full).keys() == vision_tensors(older).keys() == vision_tensors(tower).keys()
    assert len(vision_tensors(full)) == len(tower)  # the language model's tensors are not the tower's

    import onnxruntime as ort

    graph = build_vision_graph(older, record, tmp_path, name="older")
    session = ort.InferenceSession(str(tmp_path / graph["file"]), providers=["CPUExecutionProvider"])
    pixel_values, grid_thw, _ = preprocess(shapes()["wide"], PRE)
    np.testing.assert_array_equal(
        _run(session, record, pixel_values, grid_thw), _run(sessions["float32"], record, pixel_values, grid_thw)
    )

    name = "blocks.2.mlp.up_proj.weight"
    cases = {
        "missing": ({k: v for k, v in tower.items() if k != name}, f"lacks the tensor 'model.visual.{name}'"),
        "misshapen": ({**tower, name: tower[name][:, :-1]}, f"'model.visual.{name}' has shape [96, 63]"),
        "unexpected": ({**tower, "blocks.4.norm1.weight": tower["blocks.0.norm1.weight"]}, "blocks.4.norm1.weight"),
    }
    for i, (what, (weights, message)) in enumerate(cases.items()):
        with pytest.raises(CheckpointError) as e:
            build_vision_graph(weights, record, tmp_path / str(i), name=what)
        assert message in str(e.value) and "\n" not in str(e.value), what


def test_vision_config_record_from_config_json() -> None:
    """An older config.json's vision_config (``in_chans``, no rope_parameters) gives the same record."""
    from transformers import Qwen2_5_VLConfig

    from rsedge.errors import CheckpointError
    from rsedge.models.qwen2_5_vl.vision import vision_config_record

    hf = Qwen2_5_VLConfig(vision_config=TINY_VISION).vision_config
    old = {k: v for k, v in hf.to_dict().items() if k not in ("in_channels", "rope_parameters")}
    old["in_chans"] = 3
    record = vision_config_record(hf)
    assert vision_config_record(old) == record
    # the sizes only, everything structural left to transformers' defaults, which the record then carries
    sizes = {k: TINY_VISION[k] for k in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size")}
    want = Qwen2_5_VLConfig(vision_config=sizes).vision_config
    assert vision_config_record(sizes) == vision_config_record(want)
    with pytest.raises(CheckpointError, match="lacks out_hidden_size"):
        vision_config_record({k: v for k, v in sizes.items() if k != "out_hidden_size"})
    assert record["rope_theta"] == 10000.0 and record["fullatt_block_indexes"] == [1, 3]
    import json

    assert json.loads(json.dumps(record)) == record


@pytest.fixture(scope="module")
def int8_graph(vision_graphs, tmp_path_factory):
    """The FP32 graph quantized (percentile) on the built-in RS calibration set: 28 real images, many sizes."""
    from rsedge.calibration.calibset import rs_default
    from rsedge.models.qwen2_5_vl.vision import quantize_vision_graph

    record, sessions = vision_graphs
    dst = tmp_path_factory.mktemp("qwen_vision_int8") / "vision_int8.onnx"
    return quantize_vision_graph(sessions["float32_path"], dst, rs_default(), PRE, record)


def test_int8_vision_graph_within_the_vision_int8_bound(vision_graphs, int8_graph) -> None:
    """Static INT8 (percentile, the built-in RS calibration set: 28 real images of many sizes) stays within the
    project's ``vision-int8`` bound of the FP32 graph on all five shapes: max|d| <= 0.05 + 0.5 max|ref| and
    cosine >= 0.99 (measured on this tower: max|d| <= 0.28, cosine >= 0.995)."""
    import onnx
    import onnxruntime as ort

    from rsedge.export.validate import compare
    from rsedge.models.qwen2_5_vl.vision import float_matmuls

    record, sessions = vision_graphs
    graph = onnx.load(str(int8_graph), load_external_data=False).graph
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    kept = set(float_matmuls(onnx.load(str(sessions["float32_path"]), load_external_data=False)))
    # the stem, and probabilities x V: one per windowed block, one per 2-head pass in the 2 full blocks (4 heads)
    assert len(kept) == 1 + 2 + 2 * 2
    produced_by_dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for node in matmuls:  # every other MatMul reads INT8 Q/DQ inputs; the kept ones read none
        assert any(i in produced_by_dq for i in node.input) == (node.name not in kept), node.name
    int8 = ort.InferenceSession(str(int8_graph), providers=["CPUExecutionProvider"])
    for case, image in shapes().items():
        pixel_values, grid_thw, _ = preprocess(image, PRE)
        want = _run(sessions["float32"], record, pixel_values, grid_thw)
        check = compare(case, _run(int8, record, pixel_values, grid_thw), want, "vision-int8")
        assert check.passed, check


@pytest.mark.parametrize("trt", ["8.5", "8.6", "10.3"])
def test_vision_graphs_pass_the_tensorrt_parser_check(vision_graphs, int8_graph, trt: str) -> None:
    """No node, type, Q/DQ layout or opset the TensorRT parser of JetPack 5.1 / 6.0 / 6.1 rejects, FP32, FP16 and
    INT8 (int64 inputs are a warning on 8.x: bound as int32 there)."""
    from rsedge.export.trt_support import check_graph, passes

    _, sessions = vision_graphs
    for path in (sessions["float32_path"], sessions["float16_path"], int8_graph):
        issues = check_graph(path, trt)
        assert passes(issues), (path.name, [i for i in issues if i.severity == "error"])
