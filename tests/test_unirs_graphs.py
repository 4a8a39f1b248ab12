"""UniRS's tower, change module and projector as ONNX graphs, each against the PyTorch reference (1e-4)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

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
from rsedge.models.unirs.weights import load_checkpoint_tensors

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
    return UniRSForCausalLM.from_tensors(cfg, tensors), sessions


@pytest.fixture(scope="module", params=[0, 1], ids=["cc0", "cc1"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"unirs_graphs_cc{request.param}")
    ckpt = make_checkpoint(root / "ckpt", size="tiny", seed=5 + request.param, cc_layers=request.param)
    (root / "graphs").mkdir()
    return _export(ckpt, root / "graphs", EvalOverrides(cc_n_layers=request.param))


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
    px = _pixels(1, 4)
    tokens = s[PROJECTOR_ONNX].run(None, {"vision_features": s[TOWER_ONNX].run(None, {"pixel_values": px})[0]})[0]
    (want,) = model.visual_blocks("image", torch.from_numpy(px))
    np.testing.assert_allclose(tokens[0], want.numpy(), atol=TOL, rtol=0)
