"""UniRS / VILA-1.5 model side: config and strict loading of the VILA layout, the PyTorch reference against
transcriptions of the original's functions, prompts, and make-checkpoint."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch.nn import functional as F

from rsedge.cli import main
from rsedge.errors import CheckpointError, ImageError, PromptError
from rsedge.models.registry import architecture_for, by_name
from rsedge.models.unirs.checkpoint import config_dicts, make_checkpoint
from rsedge.models.unirs.config import LAYOUT_UNIRS, LAYOUT_VILA, ConfigError, EvalOverrides, UniRSConfig
from rsedge.models.unirs.modeling import DownSampleBlock, UniRSForCausalLM
from rsedge.models.unirs.prompt import build_prompt, tokenize
from rsedge.models.unirs.weights import collapse_names, expected_tensors, load_checkpoint_tensors


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("unirs")
    return {
        "cc0": make_checkpoint(root / "cc0", size="tiny", seed=0),
        "cc1": make_checkpoint(root / "cc1", size="tiny", seed=1, cc_layers=1),
        "vila": make_checkpoint(root / "vila", size="tiny", seed=2, change=False),
    }


@pytest.fixture(scope="module")
def cc0(ckpts):
    return UniRSForCausalLM.from_checkpoint(ckpts["cc0"])


@pytest.fixture(scope="module")
def cc1(ckpts):
    return UniRSForCausalLM.from_checkpoint(ckpts["cc1"], EvalOverrides(cc_n_layers=1))


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, (n, 3, 384, 384)).astype(np.float32))


# -- the downsample -----------------------------------------------------------------------------------


def _original_flat_square(x):
    """llava/model/multimodal_projector/base_projector.py lines 45-56, verbatim but for the device move."""
    n, w, h, c = x.size()
    if w % 2 == 1:
        x = torch.concat([x, torch.zeros((n, 1, h, c), dtype=x.dtype)], dim=1).contiguous()
        n, w, h, c = x.size()
    if h % 2 == 1:
        x = torch.concat([x, torch.zeros((n, w, 1, c), dtype=x.dtype)], dim=2).contiguous()
        n, w, h, c = x.size()
    x = x.view(n, w, int(h / 2), int(c * 2))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h / 2), int(w / 2), int(c * 4))
    return x


def test_downsample_matches_the_original_and_is_column_major():
    x = torch.randn(2, 729, 5)
    ours = DownSampleBlock()(x)
    theirs = _original_flat_square(x.reshape(2, 27, 27, 5)).reshape(2, -1, 20)
    assert ours.shape == (2, 196, 20)
    assert torch.equal(ours, theirs)
    # Independently: output token k = column-pair * 14 + row-pair, channels from (2r,2c) (2r,2c+1) (2r+1,2c) (2r+1,2c+1)
    grid = F.pad(x.reshape(2, 27, 27, 5), (0, 0, 0, 1, 0, 1))  # zero row 27 and column 27
    for r, c in [(0, 0), (0, 1), (1, 0), (13, 2), (5, 13), (13, 13)]:
        want = torch.cat(
            [
                grid[:, 2 * r, 2 * c],
                grid[:, 2 * r, 2 * c + 1],
                grid[:, 2 * r + 1, 2 * c],
                grid[:, 2 * r + 1, 2 * c + 1],
            ],
            -1,
        )
        assert torch.equal(ours[:, c * 14 + r], want), (r, c)
    assert not torch.equal(ours[:, 1], torch.cat([grid[:, 0, 2], grid[:, 0, 3], grid[:, 1, 2], grid[:, 1, 3]], -1))


# -- the change module ----------------------------------------------------------------------------------


def _change_by_hand(enc, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """cc_n_layers 0 written out: position tables, cosine similarity, Conv1, the bottleneck with BatchNorm on
    its running statistics (eval), as model_encoder.py lines 132-170 compute it."""
    g, C = enc.h_feat, f1.shape[-1]
    hw, ww = enc.h_embedding.weight, enc.w_embedding.weight
    pos = torch.stack([torch.cat([hw[j], ww[i]]) for i in range(g) for j in range(g)])  # h table by COLUMN j
    a = (f1[0] + pos).T.reshape(C, g, g)
    b = (f2[0] + pos).T.reshape(C, g, g)
    cos = (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-8)
    x = torch.cat([a, b])[None] + cos
    x = F.conv2d(x, enc.Conv1.weight, enc.Conv1.bias)

    def bn(t, m):
        return (t - m.running_mean[:, None, None]) / torch.sqrt(m.running_var[:, None, None] + m.eps) * m.weight[
            :, None, None
        ] + m.bias[:, None, None]

    L = enc.LN.left
    y = F.relu(bn(F.conv2d(x, L[0].weight, L[0].bias), L[1]))
    y = F.relu(bn(F.conv2d(y, L[3].weight, L[3].bias, padding=1), L[4]))
    y = bn(F.conv2d(y, L[6].weight, L[6].bias), L[7])
    return F.relu(y + x).reshape(1, C, -1).transpose(1, 2)


def test_change_module_cc0_by_hand_with_batchnorm_in_eval(cc0):
    feats = cc0.vision_features(_pixels(2))
    assert feats.shape == (2, 729, 32)
    got = cc0.change_features(feats[:1], feats[1:])
    assert not cc0.mm_projector.change.LN.left[1].training
    assert len(cc0.mm_projector.change.selftrans) == 0
    want = _change_by_hand(cc0.mm_projector.change, feats[:1], feats[1:])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Batch statistics would give another answer: the running ones are what the checkpoint means.
    cc0.mm_projector.change.train()
    try:
        with torch.no_grad():
            train_mode = cc0.mm_projector.change(feats[:1], feats[1:])
    finally:
        cc0.mm_projector.change.eval()
    assert not torch.allclose(train_mode, got, atol=1e-3)


def test_cc1_attention_pair_runs_and_takes_values_from_to_k(cc1):
    enc = cc1.mm_projector.change
    assert len(enc.selftrans) == 1
    feats = cc1.vision_features(_pixels(2, seed=1))
    base = cc1.change_features(feats[:1], feats[1:])
    with torch.no_grad():
        layers = enc.selftrans
        enc.selftrans = torch.nn.ModuleList()
        without = cc1.change_features(feats[:1], feats[1:])
        enc.selftrans = layers
        att = layers[0][0].att
        saved_v, saved_k = att.to_v.weight.clone(), att.to_k.weight.clone()
        att.to_v.weight.mul_(3.0)
        after_v = cc1.change_features(feats[:1], feats[1:])
        att.to_v.weight.copy_(saved_v)
        att.to_k.weight.mul_(3.0)
        after_k = cc1.change_features(feats[:1], feats[1:])
        att.to_k.weight.copy_(saved_k)
    assert not torch.allclose(base, without, atol=1e-3)  # the attention pair changes the map
    assert torch.equal(after_v, base)  # to_v is saved but never read (model_encoder.py line 67)
    assert not torch.allclose(after_k, base, atol=1e-3)


# -- visual blocks and prompts --------------------------------------------------------------------------


def test_blocks_per_kind(cc0):
    px = _pixels(3, seed=2)
    (image,) = cc0.visual_blocks("image", px[:1])
    (pair,) = cc0.visual_blocks("pair", px[:2])
    video = cc0.visual_blocks("video", px)
    assert image.shape == pair.shape == (196, 64) and cc0.cfg.tokens_per_image == 196
    assert len(video) == 3
    torch.testing.assert_close(video[0], image)  # each frame alone through the single branch
    (second,) = cc0.visual_blocks("image", px[1:2])
    torch.testing.assert_close(video[1], second)
    assert not torch.allclose(pair, image, atol=1e-3)
    with pytest.raises(ImageError, match="a pair takes 2 images, got 3"):
        cc0.visual_blocks("pair", px)
    with pytest.raises(ImageError, match="an image takes 1 image, got 2"):
        cc0.visual_blocks("image", px[:2])


def test_prompt_text_and_ids(ckpts):
    tok = Tokenizer.from_file(str(ckpts["cc0"] / "llm" / "tokenizer.json"))
    p = build_prompt("Describe the changes.", "pair")
    assert p.endswith(" USER: <image>\nDescribe the changes. ASSISTANT:")
    assert p.startswith("A chat between a curious user and an artificial intelligence assistant. ")
    assert build_prompt("What scene?", "video", 3).endswith("USER: <image>\n<image>\n<image>\nWhat scene? ASSISTANT:")
    ids = tokenize(tok, p, 1)
    assert ids[0] == 1 and ids.count(-200) == 1 and 1 not in ids[1:]
    k = ids.index(-200)
    # The chunk after <image> is encoded alone: a prefix ▁, then the newline byte (LLaMA's <0x0A>).
    assert [tok.id_to_token(i) for i in ids[k + 1 : k + 3]] == ["▁", "<0x0A>"]
    assert tok.token_to_id("</s>") == 2 and tok.token_to_id("<unk>") == 0
    with pytest.raises(PromptError):
        build_prompt("q", "video", 0)


def test_generate_splices_and_stops(cc0, ckpts):
    tok = Tokenizer.from_file(str(ckpts["cc0"] / "llm" / "tokenizer.json"))
    ids = tokenize(tok, build_prompt("What is this?", "image"), 1)
    px = _pixels(1, seed=4).numpy()
    tokens, logits = cc0.generate(ids, px, "image", 6)
    assert len(tokens) == len(logits) == 6 and logits[0].shape == (tok.get_vocab_size(),)
    stopped, _ = cc0.generate(ids, px, "image", 6, eos_token_id=tokens[0])
    assert stopped == tokens[:1]
    other, _ = cc0.generate(ids, _pixels(1, seed=5).numpy(), "image", 1)
    (block,) = cc0.visual_blocks("image", torch.from_numpy(px))
    embeds = cc0.embed_prompt(ids, [block])
    assert embeds.shape[1] == len(ids) - 1 + 196
    torch.testing.assert_close(embeds[0, ids.index(-200) : ids.index(-200) + 196], block)
    with pytest.raises(PromptError, match="1 <image> for 2 visual blocks"):
        cc0.embed_prompt(ids, [block, block])
    assert logits[0].argmax() == tokens[0] and other  # a different image still decodes


# -- VILA-1.5 without the change branch -----------------------------------------------------------------


def test_vila_checkpoint_loads_without_change_and_refuses_a_pair(ckpts):
    with safe_open(str(ckpts["vila"] / "mm_projector" / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(f"layers.{i}.{w}" for i in (1, 2, 4) for w in ("weight", "bias"))
    model = UniRSForCausalLM.from_checkpoint(ckpts["vila"])
    assert model.cfg.projector_layout == LAYOUT_VILA and not model.cfg.has_change
    assert not hasattr(model.mm_projector, "change")
    raw = load_file(str(ckpts["vila"] / "mm_projector" / "model.safetensors"))
    torch.testing.assert_close(model.mm_projector.single[2].weight, raw["layers.2.weight"])
    (block,) = model.visual_blocks("image", _pixels(1))
    assert block.shape == (196, 64)
    with pytest.raises(ImageError, match="no change module") as err:
        model.visual_blocks("pair", _pixels(2))
    assert "\n" not in str(err.value)
    assert model.cfg.to_manifest()["has_change"] is False


# -- strict loading -------------------------------------------------------------------------------------


def test_cc_layers_mismatch_is_named_both_ways(ckpts):
    with pytest.raises(CheckpointError, match=r"unexpected layers\.change\.selftrans\.0\.\{0-1\}\.att\.to_k") as err:
        UniRSForCausalLM.from_checkpoint(ckpts["cc1"])
    assert "pass its cc_n_layers" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=r"missing layers\.change\.selftrans\.0\.\{0-1\}\.att\.to_q\.weight"):
        UniRSForCausalLM.from_checkpoint(ckpts["cc0"], EvalOverrides(cc_n_layers=1))


def test_every_bad_tensor_is_named_in_one_line(ckpts, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpts["cc0"], bad)
    proj = bad / "mm_projector" / "model.safetensors"
    t = load_file(str(proj))
    del t["layers.change.Conv1.bias"]
    t["layers.change.extra.weight"] = torch.zeros(2)
    t["layers.single.2.weight"] = torch.zeros(3, 3)
    save_file(t, str(proj))
    llm = bad / "llm" / "model.safetensors"
    t = load_file(str(llm))
    for i in range(2):
        del t[f"model.layers.{i}.mlp.up_proj.weight"]
    save_file(t, str(llm))
    with pytest.raises(CheckpointError) as err:
        UniRSForCausalLM.from_checkpoint(bad)
    msg = str(err.value)
    assert "\n" not in msg
    assert "llm: missing model.layers.{0-1}.mlp.up_proj.weight" in msg
    assert "mm_projector: missing layers.change.Conv1.bias" in msg
    assert "unexpected layers.change.extra.weight" in msg
    assert "misshapen layers.single.2.weight (3, 3) (expected (64, 128))" in msg


def test_collapse_names_is_exact():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1, 2, 5)]
    assert collapse_names(names) == ["model.layers.{0-2,5}.mlp.up_proj.weight"]
    # 0.0 and 1.1 only: not the full product, so each is listed
    assert collapse_names(["a.0.b.0.c", "a.1.b.1.c"]) == ["a.0.b.0.c", "a.1.b.1.c"]


def test_config_records_the_eval_overrides_and_checks_the_grid(ckpts):
    cfg = UniRSConfig.from_checkpoint(ckpts["cc0"], EvalOverrides(cc_head=4, vision_resolution=-1))
    m = cfg.to_manifest()
    assert m["eval_overrides"] == {"cc_n_layers": 0, "cc_head": 4, "vision_resolution": -1}
    assert m["projector_layout"] == LAYOUT_UNIRS and m["template"] == "vicuna_v1" and m["tokens_per_image"] == 196
    assert UniRSConfig.from_checkpoint(ckpts["cc0"]).vision_resolution == 384  # the original's eval default
    with pytest.raises(ConfigError, match="vision_resolution 448 gives a 32x32 change grid"):
        UniRSConfig.from_checkpoint(ckpts["cc0"], EvalOverrides(vision_resolution=448))
    with pytest.raises(ConfigError, match="cc_head must divide"):
        EvalOverrides(cc_n_layers=1, cc_head=3)
    assert EvalOverrides(cc_head=3).cc_head == 3  # no attention at cc_n_layers 0: nothing to divide
    # VILA-1.5 has no change module, so its resolution override has nothing to disagree with.
    assert UniRSConfig.from_checkpoint(ckpts["vila"], EvalOverrides(vision_resolution=448)).tokens_per_image == 196


def test_full_size_is_vila_1_5_3b():
    top, llm, tower, proj = config_dicts("full", 32000, change=True)
    cfg = UniRSConfig.from_dicts(top, llm, tower, proj, LAYOUT_UNIRS, EvalOverrides())
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size, t.vocab_size) == (
        2560,
        32,
        20,
        6912,
        32000,
    )
    assert (t.head_dim, t.num_key_value_heads, t.rope_theta, t.max_position_embeddings) == (128, 20, 1e4, 4096)
    assert (v.hidden_size, v.num_hidden_layers, v.intermediate_size, v.num_patches) == (1152, 27, 4304, 729)
    assert cfg.change_grid == 27 and cfg.tokens_per_image == 196


# -- registry and CLI -----------------------------------------------------------------------------------


def test_registry_and_make_checkpoint_cli(ckpts, tmp_path):
    assert architecture_for(ckpts["cc0"]) == by_name("unirs")
    res = CliRunner().invoke(main, ["make-checkpoint", str(tmp_path / "v"), "--arch", "unirs", "--no-change"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "v" / "config.json").read_text())["mm_projector_cfg"]["mm_projector_type"] == (
        "mlp_downsample"
    )
    assert UniRSConfig.from_checkpoint(tmp_path / "v").projector_layout == LAYOUT_VILA
    res = CliRunner().invoke(main, ["make-checkpoint", str(tmp_path / "r"), "--cc-layers", "1"])
    assert res.exit_code == 2 and "--cc-layers does not apply to architecture 'rsunivlm'" in res.output
    res = CliRunner().invoke(
        main, ["make-checkpoint", str(tmp_path / "u"), "--arch", "unirs", "--no-change", "--cc-layers", "1"]
    )
    assert res.exit_code == 2 and "needs the change module" in res.output


def test_sharded_llm_holds_the_same_weights(ckpts, tmp_path, monkeypatch):
    from rsedge.models.unirs import checkpoint

    monkeypatch.setitem(checkpoint.SIZES["tiny"], "shard_bytes", 100_000)
    sharded = make_checkpoint(tmp_path / "sharded", size="tiny", seed=0)
    assert len(list((sharded / "llm").glob("model-*-of-*.safetensors"))) > 1
    assert (sharded / "llm" / "model.safetensors.index.json").is_file()
    cfg = UniRSConfig.from_checkpoint(sharded)
    a = load_checkpoint_tensors(sharded, cfg)
    b = load_checkpoint_tensors(ckpts["cc0"], cfg)
    assert all(torch.equal(a[f][n], b[f][n]) for f in b for n in b[f])


def test_full_size_tables_count_vila_1_5_3b_parameters():
    top, llm, tower, proj = config_dicts("full", 32000, change=True)
    cfg = UniRSConfig.from_dicts(top, llm, tower, proj, LAYOUT_UNIRS, EvalOverrides())
    count = {f: sum(math.prod(s.shape) for s in t.values()) for f, t in expected_tensors(cfg).items()}
    assert 2.69e9 < count["llm"] < 2.71e9  # Sheared-LLaMA-2.7B
    assert 0.42e9 < count["vision_tower"] < 0.44e9  # SigLIP-so400m, 27 layers and its unused head
    single = 4 * 1152 * 2 + 4608 * 2560 + 2560 + 2560 * 2560 + 2560
    assert (
        count["mm_projector"] - single
        == 2 * 27 * 576
        + 2304 * 1152
        + 1152
        + 1152 * 576
        + 576
        + 576 * 576 * 9
        + 576
        + (1152 * 576 + 1152)
        + 4 * (576 + 576)
        + 4 * 1152
        + 3
    )  # the change module at cc_n_layers 0 (BatchNorm: 4 vectors + a counter)


def test_transformers_reads_the_folders_as_upstream_does(ckpts, cc0):
    """The original loads llm/ and vision_tower/ with transformers' from_pretrained: every tensor must be
    where transformers looks for it, and compute what the reference computes."""
    from transformers import AutoTokenizer, LlamaForCausalLM, SiglipVisionModel

    lm, info = LlamaForCausalLM.from_pretrained(ckpts["cc0"] / "llm", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    tower, info = SiglipVisionModel.from_pretrained(ckpts["cc0"] / "vision_tower", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    px, embeds = _pixels(1, seed=8), torch.randn(1, 5, 64)
    with torch.no_grad():
        hf = tower(pixel_values=px, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(hf, cc0.vision_features(px), atol=1e-4, rtol=0)
        torch.testing.assert_close(
            lm(inputs_embeds=embeds).logits, cc0.lm(inputs_embeds=embeds).logits, atol=1e-4, rtol=0
        )
    hf_tok = AutoTokenizer.from_pretrained(ckpts["cc0"] / "llm")
    ours = Tokenizer.from_file(str(ckpts["cc0"] / "llm" / "tokenizer.json"))
    text = "USER: What changed?\nASSISTANT:"
    assert hf_tok(text).input_ids == ours.encode(text).ids == [1, *ours.encode(text, add_special_tokens=False).ids]
