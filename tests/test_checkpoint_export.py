"""Checkpoint layout and loading, and the bundle's manifest, storage and atomic writing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rsedge.errors import CheckpointError, ExportValidationError, OptionError
from rsedge.export import validate as validate_mod
from rsedge.export.bundle import export_bundle
from rsedge.models.rsunivlm import exporter as bundle_mod
from rsedge.models.rsunivlm.checkpoint import _save_sharded
from rsedge.models.rsunivlm.config import RSUniVLMConfig
from rsedge.models.rsunivlm.modeling import RSUniVLMForCausalLM
from rsedge.models.rsunivlm.weights import expected_tensors, load_checkpoint_tensors
from rsedge.runtime.bundle import Bundle

RELEASED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
}


def test_tiny_checkpoint_has_released_layout(tiny_checkpoint):
    assert {p.name for p in tiny_checkpoint.iterdir()} >= RELEASED_FILES
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "llava_qwen_gmoe"
    assert cfg["image_aspect_ratio"] == "square"
    assert cfg["mm_projector_type"] == "mlp2x_gelu"
    tok = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    assert tok["eos_token"] == "<|im_end|>"
    assert cfg["eos_token_id"] == json.loads((tiny_checkpoint / "added_tokens.json").read_text())["<|im_end|>"]


def test_transformers_reads_the_tokenizer_like_ours(tiny_checkpoint):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    text = "<|im_start|>user\n[VG] Where is the storage tank? [12, 34, 56, 78]<|im_end|>"
    hf = AutoTokenizer.from_pretrained(str(tiny_checkpoint))(text).input_ids
    ours = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert hf == ours


def test_sharded_checkpoint_loads_identically(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint, ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    _save_sharded(tensors, ckpt, shard_bytes=200_000)
    assert len(list(ckpt.glob("model-*-of-*.safetensors"))) > 2
    cfg = RSUniVLMConfig.from_checkpoint(ckpt)
    loaded = load_checkpoint_tensors(ckpt, cfg)
    assert set(loaded) == set(tensors)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_unexpected_tensor_is_named(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.layers.0.mlp.3.up_proj.weight"] = tensors["model.layers.0.mlp.2.up_proj.weight"].clone()
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.3\.up_proj\.weight'"):
        load_checkpoint_tensors(ckpt, RSUniVLMConfig.from_checkpoint(ckpt))


def test_weight_map_covers_every_reference_parameter(tiny_checkpoint):
    cfg = RSUniVLMConfig.from_checkpoint(tiny_checkpoint)
    model = RSUniVLMForCausalLM(cfg)
    mapped = {spec.module for spec in expected_tensors(cfg).values()}
    assert mapped == {name for name, _ in model.named_parameters()}


def test_manifest_describes_the_bundle(tiny_bundle, tiny_checkpoint):
    b = Bundle.open(tiny_bundle)
    m = b.manifest
    assert m["precision"] == "fp32"
    assert m["router"]["table"] == {"[SEG]": 2, "[VG]": 1, "[REF]": 1} and m["router"]["default"] == 0
    assert set(m["graphs"]["decoder"]["experts"]) == {"0", "1", "2"}
    dec_inputs = [i["name"] for i in m["graphs"]["decoder"]["experts"]["0"]["inputs"]]
    assert dec_inputs[:2] == ["inputs_embeds", "position_ids"]
    assert m["graphs"]["vision"]["outputs"][0]["name"] == "image_features"
    assert m["preprocess"]["kind"] == "square" and m["preprocess"]["image_size"] == 64
    assert m["source"]["sha256"] == bundle_mod.checkpoint_hash(tiny_checkpoint)
    assert all(c["passed"] for c in m["validation"]["graphs"])
    assert {"torch", "onnx", "onnxruntime"} <= set(m["tools"])
    np.testing.assert_array_equal(
        b.array("embed_tokens")[5],
        load_file(str(tiny_checkpoint / "model.safetensors"))["model.embed_tokens.weight"][5].numpy(),
    )


def test_weights_are_stored_once(tiny_bundle, tiny_checkpoint):
    """The .bin files hold each checkpoint tensor once (fused/transposed), plus alignment padding only."""
    tensors = load_file(str(tiny_checkpoint / "model.safetensors"))
    unused = {k for k in tensors if "post_layernorm" in k}  # computed upstream, never used
    needed = sum(t.numel() * 4 for k, t in tensors.items() if k not in unused)
    stored = sum(p.stat().st_size for p in Path(tiny_bundle).glob("*.bin"))
    assert needed <= stored < needed * 1.05 + 4096 * 64


def test_fp16_bundle_is_half_the_size(tiny_bundle, tiny_bundle_fp16):
    fp32 = sum(p.stat().st_size for p in Path(tiny_bundle).glob("*.bin"))
    fp16 = sum(p.stat().st_size for p in Path(tiny_bundle_fp16).glob("*.bin"))
    assert fp16 < 0.56 * fp32


def test_failed_validation_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(validate_mod.TOLERANCES, "fp32", {"atol": 0.0, "rtol": 0.0, "min_cosine": 1.1})
    with pytest.raises(ExportValidationError, match="disagrees with the PyTorch reference"):
        export_bundle(tiny_checkpoint, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused(tiny_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OptionError, match="already exists"):
        export_bundle(tiny_checkpoint, tmp_path / "out")


def test_router_override_is_recorded_and_used(tiny_checkpoint, tmp_path, samples):
    from rsedge.runtime.pipeline import Pipeline

    out = tmp_path / "b"
    export_bundle(tiny_checkpoint, out, router={"[SEG]": 2, "[VG]": 2, "[REF]": 1}, validate=False)
    pipe = Pipeline.load(out)
    assert pipe.bundle.router["table"]["[VG]"] == 2
    assert pipe.generate([samples / "dior_05863.png"], "[VG] windmill?", max_new_tokens=1).expert == 2
    with pytest.raises(OptionError, match="expert 5"):
        export_bundle(tiny_checkpoint, tmp_path / "c", router={"[VG]": 5})


def test_reference_is_single_threaded_while_it_is_the_yardstick(tiny_bundle, tiny_checkpoint, monkeypatch):
    """Validation runs the PyTorch reference on one thread (a multi-threaded first pass once moved by 4e-4
    on a loaded CPU and failed a correct bundle), and gives the caller its thread count back."""
    model = RSUniVLMForCausalLM.from_checkpoint(tiny_checkpoint)
    seen: list[int] = []
    real_step = model.step

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_step(*args, **kwargs)

    monkeypatch.setattr(model, "step", spy)
    callers = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        manifest = json.loads((Path(tiny_bundle) / "manifest.json").read_text())
        checks = validate_mod.validate_bundle(Path(tiny_bundle), manifest, model, "fp32")
        assert all(c.passed for c in checks)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(callers)
