"""Qwen2.5-VL's vision side against transformers (the oracle; written against transformers 5.24.0).

- preprocessing (numpy + Pillow) equals ``Qwen2VLImageProcessorPil`` bit for bit on real remote-sensing photos
  cut to five shapes (square, wide, tall, below min_pixels, above max_pixels), and ``smart_resize`` equals
  upstream's on a table of sizes;
- the grid feeds (window permutation, cu_window_seqlens) equal transformers' ``get_vision_window_index``;
- an aspect ratio over 200 is one ImageError line.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rsedge.demo import SAMPLES
from rsedge.errors import BundleError, ImageError
from rsedge.runtime.families.qwen2_5_vl_image import (
    FRAME_SEGMENTS,
    REVERSE_INDEX,
    WINDOW_INDEX,
    WINDOW_SEGMENTS,
    VisionPreprocess,
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


def test_preprocess_manifest_round_trip() -> None:
    assert VisionPreprocess.from_manifest(PRE.to_manifest()) == PRE
    assert VisionPreprocess.from_manifest({}) == VisionPreprocess()
    with pytest.raises(BundleError, match="min_pixels"):
        VisionPreprocess.from_manifest({"min_pixels": 10, "max_pixels": 5})
    with pytest.raises(BundleError, match="resample"):
        VisionPreprocess.from_manifest({"resample": "box-ish"})


VISION = {"spatial_merge_size": 2, "patch_size": 14, "hidden_size": 64, "num_heads": 4, "window_size": 56}


@pytest.mark.parametrize("grid", [[[1, 14, 14]], [[1, 8, 12]], [[1, 4, 30]], [[1, 16, 16]], [[1, 8, 12], [2, 4, 6]]])
def test_window_index_equals_transformers(grid: list[list[int]]) -> None:
    want_index, want_cu = get_vision_window_index(torch.tensor(grid), 2, 56, 14)
    index, cu = window_index(np.array(grid), 2, 56, 14)
    np.testing.assert_array_equal(index, want_index.numpy())
    np.testing.assert_array_equal(cu, want_cu.numpy())
    feeds = vision_feeds(np.array(grid), VISION)
    np.testing.assert_array_equal(feeds[WINDOW_INDEX][feeds[REVERSE_INDEX]], np.arange(index.size))
    # segments: one id per cu_window_seqlens interval, one per frame
    seg = feeds[WINDOW_SEGMENTS]
    assert seg.size == cu[-1] and np.array_equal(np.bincount(seg), np.diff(cu))
    frames = sum(t for t, _, _ in grid)
    assert feeds[FRAME_SEGMENTS].max() == frames - 1


def test_vision_feeds_refuse_a_bad_record_or_grid() -> None:
    with pytest.raises(BundleError, match="window_size"):
        vision_feeds(np.array([[1, 4, 4]]), {**VISION, "window_size": 14})
    with pytest.raises(BundleError, match="num_heads"):
        vision_feeds(np.array([[1, 4, 4]]), {k: v for k, v in VISION.items() if k != "num_heads"})
    with pytest.raises(ImageError, match="merge blocks"):
        vision_feeds(np.array([[1, 5, 4]]), VISION)
