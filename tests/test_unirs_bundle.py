"""UniRS / VILA-1.5 bundles end to end: export, then the runtime (onnxruntime, no torch) against the PyTorch
reference on tiny checkpoints.

FP32: a single image, a change pair and video frames each give 32 identical greedy tokens and every step's
logits within 1e-4 of the reference, fed as the bundle's family feeds the runtime (its prompt ids and pixels).
FP16: the repo's bar (tests/test_parity.py): first-step cosine > 0.999, greedy tokens agree for 16 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from rsedge.cli import main
from rsedge.errors import BundleError, ImageError
from rsedge.models.unirs import export, make_checkpoint
from rsedge.models.unirs.config import EvalOverrides
from rsedge.models.unirs.modeling import UniRSForCausalLM
from rsedge.models.unirs.prompt import IMAGE, PAIR, VIDEO, build_prompt, tokenize
from rsedge.runtime.families.vila import expand2square
from rsedge.runtime.pipeline import Pipeline
from rsedge.runtime.video import frame_indices, read_video

NEW_TOKENS = 32
FP32_ATOL = 1e-4
QUESTIONS = {
    IMAGE: "What is in this image?",
    PAIR: "Please briefly describe the changes in these two images.",
    VIDEO: "What is the category of this video?",
}
# name -> (make_checkpoint kwargs, cc_n_layers, image_aspect_ratio written into config.json)
CHECKPOINTS = {
    "cc0": (dict(seed=11, cc_layers=0), 0, "resize"),
    "cc1": (dict(seed=12, cc_layers=1), 1, "pad"),
    "vila": (dict(seed=13, change=False), 0, "resize"),
}


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A smooth, non-square scene (noise would make every model's answer a coin toss)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    chans = [127 + 120 * np.sin(6.3 * (a * xx + b * yy) + c) for a, b, c in rng.uniform(0.3, 3.0, (3, 3))]
    return Image.fromarray(np.stack(chans, -1).astype(np.uint8))


def _write_video(path: Path, frames: int, size: tuple[int, int] = (96, 64)) -> Path:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for k in range(frames):
            for packet in stream.encode(av.VideoFrame.from_image(_image(100 + k, size))):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("unirs_bundles")


@pytest.fixture(scope="module")
def checkpoints(root) -> dict[str, Path]:
    out = {}
    for name, (kwargs, _, aspect) in CHECKPOINTS.items():
        ckpt = make_checkpoint(root / f"ckpt_{name}", size="tiny", **kwargs)
        cfg = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({**cfg, "image_aspect_ratio": aspect}, indent=2))
        out[name] = ckpt
    return out


@pytest.fixture(scope="module")
def bundles(root, checkpoints) -> dict[str, Path]:
    out = {}
    for name, ckpt in checkpoints.items():
        out[name] = root / f"bundle_{name}"
        export(ckpt, out[name], cc_n_layers=CHECKPOINTS[name][1])
    return out


@pytest.fixture(scope="module")
def references(checkpoints) -> dict[str, UniRSForCausalLM]:
    return {
        name: UniRSForCausalLM.from_checkpoint(ckpt, EvalOverrides(cc_n_layers=CHECKPOINTS[name][1]))
        for name, ckpt in checkpoints.items()
    }


@pytest.fixture(scope="module")
def video_frames(root) -> list[Image.Image]:
    return read_video(_write_video(root / "clip.mp4", 12), 8)


def _inputs(kind: str, frames: list[Image.Image]) -> list[Image.Image]:
    if kind == IMAGE:
        return [_image(1, (320, 240))]
    if kind == PAIR:
        return [_image(2, (256, 256)), _image(3, (256, 256))]
    return frames


def _reference(model: UniRSForCausalLM, pipe: Pipeline, kind: str, images: list[Image.Image]):
    """The reference fed as the bundle is: the family's pixels; the ids of the reference's own prompt builder,
    which must be the family's."""
    ids = tokenize(pipe.tokenizer, build_prompt(QUESTIONS[kind], kind, len(images)), model.cfg.bos_token_id)
    assert pipe.family.prompt_ids(QUESTIONS[kind], len(images)) == ids
    pixels = np.concatenate([pipe.family.pixel_values(im) for im in images])
    return model.generate(ids, pixels, kind, NEW_TOKENS, eos_token_id=-1)


# A VILA-1.5 bundle refuses a pair (test_pair_to_a_bundle_without_change_module).
@pytest.mark.parametrize(
    "name,kind", [(n, k) for n in CHECKPOINTS for k in (IMAGE, PAIR, VIDEO) if (n, k) != ("vila", PAIR)]
)
def test_fp32_bundle_matches_the_reference(name, kind, bundles, references, video_frames):
    pipe = Pipeline.load(bundles[name], threads=1)
    images = _inputs(kind, video_frames)
    ans = pipe.generate(images, QUESTIONS[kind], max_new_tokens=NEW_TOKENS, keep_logits=True, ignore_eos=True)
    ref_tokens, ref_logits = _reference(references[name], pipe, kind, images)
    blocks = len(images) if kind == VIDEO else 1
    assert ans.prompt_tokens - blocks * 196 == len(pipe.family.prompt_ids(QUESTIONS[kind], len(images))) - blocks
    assert len(ans.tokens) == NEW_TOKENS
    assert ans.tokens == ref_tokens
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ans.step_logits, ref_logits, strict=True))
    assert diff <= FP32_ATOL, f"max |logits diff| {diff:.2e}"


def test_manifest_records_architecture_prompt_preprocess_and_overrides(bundles):
    m = {n: json.loads((b / "manifest.json").read_text()) for n, b in bundles.items()}
    assert {x["architecture"] for x in m.values()} == {"unirs"}
    assert m["cc1"]["model"]["eval_overrides"]["cc_n_layers"] == 1 and m["cc1"]["model"]["has_change"]
    assert m["vila"]["model"]["has_change"] is False and "change" not in m["vila"]["graphs"]
    assert set(m["cc0"]["graphs"]) == {"vision", "projector", "change", "decoder"}
    assert (m["cc0"]["preprocess"]["aspect_ratio"], m["cc1"]["preprocess"]["aspect_ratio"]) == ("resize", "pad")
    p = m["cc0"]["prompt"]
    assert p["template"] == "{system} USER: {user} ASSISTANT:" and p["stop"] == "</s>" and p["bos_token_id"] == 1
    assert m["cc0"]["tokenizer"]["stop_token_ids"] == [2]
    assert list(m["cc0"]["graphs"]["decoder"]["experts"]) == ["0"]


def test_pad_bundle_pads_with_the_mean_colour(bundles):
    pipe = Pipeline.load(bundles["cc1"])
    wide = _image(4, (300, 100))
    square = expand2square(wide, (127, 127, 127))
    assert square.size == (300, 300) and square.getpixel((0, 0)) == (127, 127, 127)
    assert square.getpixel((150, 150)) == wide.getpixel((150, 50))
    stretched = Pipeline.load(bundles["cc0"]).family.pixel_values(wide)
    padded = pipe.family.pixel_values(wide)
    assert padded.shape == stretched.shape == (1, 3, 384, 384)
    assert np.allclose(padded[0, :, 0, 0], -1 / 255, atol=1e-6)  # (127/255 - 0.5) / 0.5
    assert not np.allclose(padded, stretched)


def test_fp16_bundle_tracks_the_reference(root, checkpoints, references, video_frames):
    out = root / "bundle_cc1_fp16"
    export(checkpoints["cc1"], out, cc_n_layers=1, precision="fp16")
    pipe = Pipeline.load(out, threads=1)
    for kind in (IMAGE, PAIR, VIDEO):
        images = _inputs(kind, video_frames)
        ans = pipe.generate(images, QUESTIONS[kind], max_new_tokens=NEW_TOKENS, keep_logits=True, ignore_eos=True)
        ref_tokens, ref_logits = _reference(references["cc1"], pipe, kind, images)
        a, b = ans.step_logits[0].astype(np.float64), ref_logits[0].astype(np.float64)
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.999
        agree = next((k for k, (x, y) in enumerate(zip(ans.tokens, ref_tokens, strict=False)) if x != y), NEW_TOKENS)
        assert agree >= 16, f"{kind}: fp16 greedy tokens diverge from the fp32 reference at step {agree}"


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_bundles_export_validate_and_run(precision, root, checkpoints, video_frames):
    out = root / f"bundle_cc0_{precision}"
    manifest = export(checkpoints["cc0"], out, precision=precision, block_size=32)
    assert all(c["passed"] for c in manifest["validation"]["graphs"])
    assert manifest["quantization"] is not None and manifest["architecture"] == "unirs"
    pipe = Pipeline.load(out, threads=1)
    for kind in (IMAGE, PAIR, VIDEO):
        ans = pipe.generate(_inputs(kind, video_frames), QUESTIONS[kind], max_new_tokens=8, ignore_eos=True)
        assert len(ans.tokens) == 8


def test_pair_to_a_bundle_without_change_module(bundles):
    pipe = Pipeline.load(bundles["vila"])
    with pytest.raises(ImageError, match="no change module"):
        pipe.generate([_image(2, (64, 64)), _image(3, (64, 64))], QUESTIONS[PAIR], max_new_tokens=2)


def test_frames_are_sampled_as_the_original_does():
    assert frame_indices(12, 8) == [int(i) for i in np.linspace(0, 10, 8)]
    assert frame_indices(100, 3) == [0, 49, 98]


def test_video_with_too_few_frames_and_corrupt_video_are_one_line(root):
    short = _write_video(root / "short.mp4", 5)
    with pytest.raises(ImageError, match="5 frames, fewer than the 8 asked"):
        read_video(short, 8)
    bad = root / "corrupt.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(ImageError, match="cannot decode the video") as e:
        read_video(bad, 8)
    assert "\n" not in str(e.value)


def test_cli_runs_video_frames_dir_and_refuses_bad_clips(root, bundles, video_frames):
    runner = CliRunner()
    clip = root / "clip.mp4"
    res = runner.invoke(main, ["run", str(bundles["cc0"]), "--video", str(clip), "--frames", "8",
                               "--prompt", QUESTIONS[VIDEO], "--max-new-tokens", "6", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    via_cli = json.loads(res.output)
    api = Pipeline.load(bundles["cc0"]).generate(video_frames, QUESTIONS[VIDEO], max_new_tokens=6)
    assert via_cli["token_ids"] == api.tokens
    assert via_cli["prompt_tokens"] == api.prompt_tokens
    frames = root / "frames"
    frames.mkdir(exist_ok=True)
    for k, im in enumerate(video_frames):
        im.save(frames / f"f{k:02d}.png")
    res = runner.invoke(main, ["run", str(bundles["cc0"]), "--frames-dir", str(frames), "--prompt",
                               QUESTIONS[VIDEO], "--max-new-tokens", "6", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["token_ids"] == api.tokens  # PNG frames are lossless: the same clip
    for args, message in (
        (["--video", str(root / "short.mp4"), "--frames", "8"], "fewer than the 8 asked"),
        (["--video", str(root / "corrupt.mp4")], "cannot decode the video"),
        (["--video", str(clip), "--frames", "2"], "two images are a change pair"),
        (["--video", str(clip), "--image", str(clip)], "take no --image"),
    ):
        res = runner.invoke(main, ["run", str(bundles["cc0"]), *args, "--prompt", "q"])
        assert res.exit_code != 0
        assert message in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_runtime_import_has_no_torch():
    """The family and the video reader are runtime modules (the torch-free rule of tests/test_runtime_lean.py)."""
    import ast

    for mod in ("rsedge/runtime/families/vila.py", "rsedge/runtime/video.py"):
        tree = ast.parse((Path(__file__).parents[1] / mod).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {n for n in names if n.split(".")[0] in ("torch", "transformers", "onnx")}, mod


def test_cli_export_takes_cc_layers_and_other_architectures_refuse_it(checkpoints, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["export", str(checkpoints["cc1"]), "-o", str(tmp_path / "b"), "--cc-layers", "1"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["model"]["eval_overrides"]["cc_n_layers"] == 1
    res = runner.invoke(main, ["export", str(checkpoints["cc1"]), "-o", str(tmp_path / "c")])
    assert res.exit_code != 0 and "pass its cc_n_layers" in res.output and not (tmp_path / "c").exists()
    other = tmp_path / "rsunivlm"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llava_qwen_gmoe"}))
    res = runner.invoke(main, ["export", str(other), "-o", str(tmp_path / "d"), "--cc-layers", "1"])
    assert res.exit_code != 0 and "--cc-layers is a unirs option" in res.output


def test_warmup_and_run_graph(bundles):
    """Warm-up runs every graph a request takes (projector and decoder too); run_graph names a missing graph."""
    pipe = Pipeline.load(bundles["cc0"], warmup=True)
    assert set(pipe._graphs) == {"projector"} and set(pipe._decoders) == {0}
    features = pipe.run_graph("vision", {"pixel_values": np.zeros((2, 3, 384, 384), np.float32)})[0]
    (change,) = pipe.run_graph("change", {"pair_features": features})
    assert features.shape == (2, 729, 32) and change.shape == (1, 729, 32)
    with pytest.raises(BundleError, match="no graph 'change'"):
        Pipeline.load(bundles["vila"]).run_graph("change", {"pair_features": features})
