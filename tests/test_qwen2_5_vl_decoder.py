"""Qwen2.5-VL's language model is a DecoderSpec of the one builder (mrope): its graphs match transformers'
model within 1e-4 in every attention form, prefill (an image's shared rotary positions) and decode steps; and
RSUniVLM / LLaMA specs take no rotary-position input (their graphs are untouched)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from rsedge.errors import OptionError
from rsedge.export.decoder_graph import ATTENTION_IMPLS, ROPE_POSITION_IDS, SHARED_KV, build_decoder_graph, expert_onnx
from rsedge.export.decoder_spec import DecoderSpec, llama, qwen2_5_vl
from rsedge.export.onnx_builder import save_graph
from rsedge.export.weight_store import WeightStore
from rsedge.models.qwen2_5_vl.weights import load_checkpoint_tensors
from rsedge.runtime.backends import DecoderSpec as RuntimeSpec
from rsedge.runtime.backends import backend_class
from rsedge.runtime.mrope import MropePositions, expand_image_tokens, rope_index
from rsedge.runtime.sessions import SessionConfig
from tests.qwen2_5_vl_helpers import reference, reference_logits, tiny_checkpoint

STEPS = 6
TOL = 1e-4  # fp32 graph against fp32 eager transformers


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    ref = reference(ckpt)
    cfg = ref.cfg
    weights = {k: v.float().numpy() for k, v in load_checkpoint_tensors(ckpt, cfg).items()}
    grid = (1, 6, 10)  # a wide image: 3 x 5 merged tokens
    ids = [5, 9, cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id, 40, 41, 42, 43]
    ids = expand_image_tokens(ids, [15], cfg.image_token_id)
    pos, delta = rope_index(ids, [grid], cfg.image_token_id, cfg.spatial_merge_size)
    feeds = MropePositions(pos, delta)
    total = len(ids) + STEPS
    embeds = np.random.default_rng(1).standard_normal((1, total, cfg.text.hidden_size)).astype(np.float32)
    want = reference_logits(ref, embeds, feeds(0, total)[ROPE_POSITION_IDS][:, 0])
    return cfg, weights, feeds, embeds, want, len(ids)


@pytest.mark.parametrize("attention", ATTENTION_IMPLS)
def test_mrope_decoder_matches_transformers(case, attention, tmp_path):
    cfg, weights, feeds, embeds, want, prompt = case
    spec = qwen2_5_vl(cfg.text, cfg.mrope_section)
    graph = build_decoder_graph(spec, weights, 0, WeightStore(tmp_path), "float32", attention=attention)
    save_graph(graph, tmp_path / expert_onnx(0))
    inputs = [i.name for i in onnx.load(str(tmp_path / expert_onnx(0)), load_external_data=False).graph.input]
    assert inputs[:3] == ["inputs_embeds", "position_ids", ROPE_POSITION_IDS]
    shared = attention in SHARED_KV
    rt = RuntimeSpec(cfg.text.num_hidden_layers, cfg.text.num_key_value_heads, cfg.text.head_dim, shared_kv=shared)
    dec = backend_class("cpu")(tmp_path / expert_onnx(0), rt, SessionConfig(threads=1))
    state = dec.new_state(prompt + STEPS)
    state.extra_inputs = feeds
    got = [dec.step(embeds[:, :5], state).copy(), dec.step(embeds[:, 5:prompt], state).copy()]  # a chunked prefill
    for j in range(prompt, prompt + STEPS - 1):
        got.append(dec.step(embeds[:, j : j + 1], state).copy())
    np.testing.assert_allclose(got[0], want[4], atol=TOL, rtol=0)
    for k, logits in enumerate(got[1:]):
        np.testing.assert_allclose(logits, want[prompt - 1 + k], atol=TOL, rtol=0)


def test_rotary_positions_matter(case, tmp_path):
    """The same graph fed the cache slots as rotary positions (what a plain Qwen2 would use) disagrees: the
    parity above is not an accident of positions that coincide."""
    cfg, weights, _, embeds, want, prompt = case
    spec = qwen2_5_vl(cfg.text, cfg.mrope_section)
    save_graph(build_decoder_graph(spec, weights, 0, WeightStore(tmp_path)), tmp_path / expert_onnx(0))
    rt = RuntimeSpec(cfg.text.num_hidden_layers, cfg.text.num_key_value_heads, cfg.text.head_dim)
    dec = backend_class("cpu")(tmp_path / expert_onnx(0), rt, SessionConfig(threads=1))
    state = dec.new_state(prompt)
    state.extra_inputs = MropePositions(np.zeros((3, 0), dtype=np.int64), 0)
    assert np.abs(dec.step(embeds[:, :prompt], state) - want[prompt - 1]).max() > 1e-2


def test_specs_refuse_bad_mrope(case, tmp_path):
    cfg = case[0]
    with pytest.raises(OptionError, match="mrope needs 3 sections summing to head_dim/2 = 8"):
        qwen2_5_vl(cfg.text, (2, 3, 2))
    with pytest.raises(OptionError, match="mrope_section is for rope 'mrope'"):
        DecoderSpec(cfg.text, rope="rotate-half", mrope_section=(2, 3, 3))
    graph = build_decoder_graph(llama(cfg.text), case[1], 0, WeightStore(tmp_path), "float32")
    assert ROPE_POSITION_IDS not in [i.name for i in graph.graph.input]
