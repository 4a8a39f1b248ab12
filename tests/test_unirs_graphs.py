"""UniRS's tower, change module and projector as ONNX graphs, each against the PyTorch reference (1e-4)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tokenizers import Tokenizer

from rsedge.errors import CheckpointError
from rsedge.export.decoder_graph import build_decoder_graph, expert_onnx
from rsedge.export.decoder_spec import llama
from rsedge.export.onnx_builder import save_graph
from rsedge.export.weight_store import WeightStore
from rsedge.models.unirs.checkpoint import make_checkpoint
from rsedge.models.unirs.config import EvalOverrides, UniRSConfig
from rsedge.models.unirs.graphs import (
    CHANGE_ONNX,
    PROJECTOR_ONNX,
    TOWER_ONNX,
    build_change_graph,
    build_projector_graph,
    build_tower_graph,
    tower_layers,
)
from rsedge.models.unirs.modeling import UniRSForCausalLM
from rsedge.models.unirs.prompt import build_prompt, tokenize
from rsedge.models.unirs.weights import load_checkpoint_tensors
from rsedge.runtime.backends import DecoderSpec as RuntimeSpec
from rsedge.runtime.backends import backend_class
from rsedge.runtime.sessions import SessionConfig

TOL = 1e-4


def _session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _export(ckpt, folder, overrides: EvalOverrides):
    cfg = UniRSConfig.from_checkpoint(ckpt, overrides)
    tensors = load_checkpoint_tensors(ckpt, cfg)
    weights = {f: {k: v.numpy() for k, v in t.items()} for f, t in tensors.items()}
    store = WeightStore(folder)
    graphs = {TOWER_ONNX: build_tower_graph, PROJECTOR_ONNX: build_projector_graph}
    if cfg.has_change:
        graphs[CHANGE_ONNX] = build_change_graph
    sessions = {}
    for name, build in graphs.items():
        save_graph(build(cfg, weights, store), folder / name)
        sessions[name] = _session(folder / name)
    model = UniRSForCausalLM.from_tensors(cfg, tensors)
    model.weights = weights  # for the decoder test: the same arrays the graphs were built from
    return model, sessions


@pytest.fixture(scope="module", params=[0, 1], ids=["cc0", "cc1"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"unirs_graphs_cc{request.param}")
    ckpt = make_checkpoint(root / "ckpt", size="tiny", seed=5 + request.param, cc_layers=request.param)
    (root / "graphs").mkdir()
    model, sessions = _export(ckpt, root / "graphs", EvalOverrides(cc_n_layers=request.param))
    model.checkpoint = ckpt
    return model, sessions


def _pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, 384, 384)).astype(np.float32)


def test_tower_graph_matches_and_skips_the_unused_last_layer(exported):
    model, s = exported
    px = _pixels(2, 0)
    got = s[TOWER_ONNX].run(None, {"pixel_values": px})[0]
    want = model.vision_features(torch.from_numpy(px)).numpy()
    assert got.shape == (2, 729, 32)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    assert tower_layers(model.cfg) == model.cfg.vision.num_hidden_layers - 1


def test_projector_graph_matches_single_branch(exported):
    model, s = exported
    feats = model.vision_features(torch.from_numpy(_pixels(3, 1)))
    got = s[PROJECTOR_ONNX].run(None, {"vision_features": feats.numpy()})[0]
    with torch.no_grad():
        want = model.mm_projector.single(feats).numpy()
    assert got.shape == (3, 196, 64)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_change_graph_with_folded_batchnorm_matches(exported):
    model, s = exported
    feats = model.vision_features(torch.from_numpy(_pixels(2, 2)))
    got = s[CHANGE_ONNX].run(None, {"pair_features": feats.numpy()})[0]
    want = model.change_features(feats[:1], feats[1:]).numpy()
    assert got.shape == (1, 729, 32)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    assert len(model.mm_projector.change.selftrans) == model.cfg.cc_n_layers


def test_pair_through_three_graphs_equals_the_reference_block(exported):
    model, s = exported
    px = _pixels(2, 3)
    feats = s[TOWER_ONNX].run(None, {"pixel_values": px})[0]
    change = s[CHANGE_ONNX].run(None, {"pair_features": feats})[0]
    block = s[PROJECTOR_ONNX].run(None, {"vision_features": change})[0][0]
    (want,) = model.visual_blocks("pair", torch.from_numpy(px))
    np.testing.assert_allclose(block, want.numpy(), atol=TOL, rtol=0)


def test_vila_checkpoint_exports_tower_and_projector_only(tmp_path):
    ckpt = make_checkpoint(tmp_path / "vila", size="tiny", seed=7, change=False)
    (tmp_path / "g").mkdir()
    model, s = _export(ckpt, tmp_path / "g", EvalOverrides())
    assert set(s) == {TOWER_ONNX, PROJECTOR_ONNX}
    with pytest.raises(CheckpointError, match="no change module"):
        build_change_graph(model.cfg, model.weights, WeightStore(tmp_path / "g"))
    px = _pixels(1, 4)
    tokens = s[PROJECTOR_ONNX].run(None, {"vision_features": s[TOWER_ONNX].run(None, {"pixel_values": px})[0]})[0]
    (want,) = model.visual_blocks("image", torch.from_numpy(px))
    np.testing.assert_allclose(tokens[0], want.numpy(), atol=TOL, rtol=0)


def test_pair_prompt_through_graphs_and_llama_decoder_decodes_like_the_reference(exported, tmp_path):
    """Graph level (no bundle yet): three vision graphs, the dense LLaMA decoder spec, greedy decoding."""
    model, s = exported
    cfg = model.cfg
    graph = build_decoder_graph(llama(cfg.text), model.weights["llm"], 0, WeightStore(tmp_path), "float32")
    save_graph(graph, tmp_path / expert_onnx(0))
    t = cfg.text
    dec = backend_class("cpu")(
        tmp_path / expert_onnx(0),
        RuntimeSpec(t.num_hidden_layers, t.num_key_value_heads, t.head_dim),
        SessionConfig(threads=1),
    )
    tok = Tokenizer.from_file(str(model.checkpoint / "llm" / "tokenizer.json"))
    ids = tokenize(tok, build_prompt("Please briefly describe the changes in these two images.", "pair"), 1)
    px = _pixels(2, 6)
    steps = 8
    want_tokens, want_logits = model.generate(ids, px, "pair", steps, eos_token_id=-1)

    feats = s[TOWER_ONNX].run(None, {"pixel_values": px})[0]
    block = s[PROJECTOR_ONNX].run(None, {"vision_features": s[CHANGE_ONNX].run(None, {"pair_features": feats})[0]})[0]
    table = model.weights["llm"]["model.embed_tokens.weight"]
    k = ids.index(-200)
    embeds = np.concatenate([table[ids[:k]], block[0], table[ids[k + 1 :]]])[None].astype(np.float32)
    state = dec.new_state(embeds.shape[1] + steps)
    logits = dec.step(embeds, state).reshape(-1).copy()
    tokens = []
    for j in range(steps):
        np.testing.assert_allclose(logits, want_logits[j], atol=TOL, rtol=0)
        tokens.append(int(logits.argmax()))
        logits = dec.step(table[[tokens[-1]]][None].astype(np.float32), state).reshape(-1).copy()
    assert tokens == want_tokens


def test_float16_graphs_stay_near_the_float32_reference(tmp_path):
    """fp16 weights and activations (softmax, norms and the cosine in float32 islands): a pair within 2e-2
    of the block's scale (measured: about 3e-3 at a scale of 3)."""
    ckpt = make_checkpoint(tmp_path / "ckpt", size="tiny", seed=9, cc_layers=1)
    cfg = UniRSConfig.from_checkpoint(ckpt, EvalOverrides(cc_n_layers=1))
    tensors = load_checkpoint_tensors(ckpt, cfg)
    weights = {f: {k: v.numpy() for k, v in t.items()} for f, t in tensors.items()}
    store = WeightStore(tmp_path)
    s = {}
    for name, build in (
        (TOWER_ONNX, build_tower_graph),
        (CHANGE_ONNX, build_change_graph),
        (PROJECTOR_ONNX, build_projector_graph),
    ):
        save_graph(build(cfg, weights, store, "float16"), tmp_path / name)
        s[name] = _session(tmp_path / name)
    px = _pixels(2, 10)
    feats = s[TOWER_ONNX].run(None, {"pixel_values": px.astype(np.float16)})[0]
    change = s[CHANGE_ONNX].run(None, {"pair_features": feats})[0]
    block = s[PROJECTOR_ONNX].run(None, {"vision_features": change})[0][0]
    (want,) = UniRSForCausalLM.from_tensors(cfg, tensors).visual_blocks("pair", torch.from_numpy(px))
    assert block.dtype == np.float16
    assert np.abs(block.astype(np.float32) - want.numpy()).max() <= 2e-2 * max(1.0, float(want.abs().max()))
