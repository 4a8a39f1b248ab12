"""Qwen2.5-VL checkpoints: the tiny one loads strictly into transformers' model (the same weights transformers'
own from_pretrained reads); transformers 5's tensor names and nested config load the same; a missing, extra or
misshapen tensor is named in one line; `rsedge make-checkpoint --arch qwen2_5_vl` writes it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from rsedge.cli import main
from rsedge.errors import CheckpointError
from rsedge.models.qwen2_5_vl.config import Qwen25VLConfig
from rsedge.models.qwen2_5_vl.modeling import Qwen25VLReference
from rsedge.models.qwen2_5_vl.weights import load_checkpoint_tensors
from tests.qwen2_5_vl_helpers import tiny_checkpoint

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _copy_with(ckpt, tmp_path, edit):
    out = tmp_path / "edited"
    shutil.copytree(ckpt, out)
    tensors = load_file(str(out / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    return out


def test_tiny_checkpoint_loads_as_transformers_reads_it(ckpt):
    ref = Qwen25VLReference.from_checkpoint(ckpt)
    theirs = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(ckpt)).float()
    ours_sd, theirs_sd = ref.model.state_dict(), theirs.state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    assert all(torch.equal(ours_sd[k], theirs_sd[k]) for k in theirs_sd)
    assert ref.model.lm_head.weight is ref.model.model.language_model.embed_tokens.weight  # tied, as released
    assert ref.cfg.mrope_section == (2, 3, 3) and ref.cfg.text.num_experts == 1


def test_transformers5_names_and_nested_config_load_the_same(ckpt, tmp_path):
    """save_pretrained's config.json (text_config nested, rope_parameters) and the in-memory names
    (model.visual.*, model.language_model.*) are read as the released layout."""
    theirs = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(ckpt))
    out = tmp_path / "v5"
    theirs.save_pretrained(str(out))
    raw = json.loads((out / "config.json").read_text())
    assert "text_config" in raw and "rope_parameters" in raw["text_config"]
    flat = Qwen25VLConfig.from_checkpoint(ckpt)
    nested = Qwen25VLConfig.from_checkpoint(out)
    assert (nested.text, nested.mrope_section, nested.image_token_id) == (
        flat.text,
        flat.mrope_section,
        flat.image_token_id,
    )
    renamed = {k: v.contiguous() for k, v in theirs.state_dict().items() if k != "lm_head.weight"}
    assert any(k.startswith("model.language_model.") for k in renamed)
    for f in out.glob("*.safetensors"):
        f.unlink()
    save_file(renamed, str(out / WEIGHTS), metadata={"format": "pt"})
    a, b = load_checkpoint_tensors(ckpt, flat), load_checkpoint_tensors(out, nested)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"),
            "missing tensor model.layers.1.self_attn.k_proj.bias",
        ),
        (lambda t: t.update({"lm_head.weight": torch.zeros(704, 64)}), "unexpected tensor lm_head.weight"),
        (
            lambda t: t.update({"visual.blocks.0.attn.qkv.weight": torch.zeros(96, 31)}),
            r"tensor visual.blocks.0.attn.qkv.weight has shape \[96, 31\], the config implies \[96, 32\]",
        ),
        (
            lambda t: t.update({"model.language_model.norm.weight": t["model.norm.weight"].clone()}),
            "tensor model.norm.weight appears twice",
        ),
    ],
    ids=["missing", "extra", "misshapen", "both-spellings"],
)
def test_bad_tensors_are_named(ckpt, tmp_path, edit, message):
    bad = _copy_with(ckpt, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint_tensors(bad, Qwen25VLConfig.from_checkpoint(bad))


def test_bad_config_is_one_line(ckpt, tmp_path):
    out = tmp_path / "cfg"
    shutil.copytree(ckpt, out)
    raw = json.loads((out / "config.json").read_text())
    raw["rope_scaling"]["mrope_section"] = [2, 3, 2]
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"mrope_section \[2, 3, 2\] must be 3 numbers summing to head_dim/2 = 8"):
        Qwen25VLConfig.from_checkpoint(out)


def test_make_checkpoint_cli(tmp_path):
    res = CliRunner().invoke(main, ["make-checkpoint", str(tmp_path / "q"), "--arch", "qwen2_5_vl", "--seed", "4"])
    assert res.exit_code == 0, res.output
    names = {p.name for p in (tmp_path / "q").iterdir()}
    assert {"config.json", WEIGHTS, "tokenizer.json", "preprocessor_config.json", "generation_config.json"} <= names
    res = CliRunner().invoke(main, ["make-checkpoint", str(tmp_path / "r"), "--arch", "qwen2_5_vl", "--tied"])
    assert res.exit_code != 0 and "--tied does not apply to architecture 'qwen2_5_vl'" in res.output
