"""Hand-built ONNX graphs (vision tower + connector, a decoder per expert) vs transformers, on ORT CPU."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from rsedge.errors import CheckpointError, OptionError
from rsedge.export.decoder_graph import (
    DECODER_SHARED_BIN,
    EMBED_TOKENS,
    build_decoder_graph,
    decoder_input_names,
    decoder_output_names,
    expert_bin,
    expert_onnx,
    past_names,
    store_embedding_table,
)
from rsedge.export.onnx_builder import save_graph
from rsedge.export.vision_graph import TOWER, VISION_ONNX, build_vision_graph
from rsedge.export.weight_store import WeightStore
from rsedge.models.rsunivlm.config import RSUniVLMConfig, TextConfig, VisionConfig

TEXT = TextConfig(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=64,
    num_experts=3,
)
VISION = VisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    patch_size=8,
    image_size=32,
)
CFG = RSUniVLMConfig(text=TEXT, vision=VISION, vision_tower="tiny-siglip")
SEQ, DECODE_STEPS, POS0 = 7, 3, 2  # positions start at 2: RoPE must follow position_ids, not the cache length
UNUSED = ("post_layernorm", "image_newline")


def _random_weights(cfg: RSUniVLMConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t, v = cfg.text, cfg.vision
    H, hd, inter, V = t.hidden_size, t.head_dim, t.intermediate_size, t.vocab_size
    w: dict[str, np.ndarray] = {}

    def put(name: str, shape: tuple[int, ...], std: float = 0.1, mean: float = 0.0) -> None:
        w[name] = (mean + std * rng.standard_normal(shape)).astype(np.float32)

    put("model.embed_tokens.weight", (V, H), 0.5)
    for i in range(t.num_hidden_layers):
        p = f"model.layers.{i}"
        for proj, n in (
            ("q", t.num_attention_heads),
            ("k", t.num_key_value_heads),
            ("v", t.num_key_value_heads),
        ):
            put(f"{p}.self_attn.{proj}_proj.weight", (n * hd, H), 0.15)
            put(f"{p}.self_attn.{proj}_proj.bias", (n * hd,), 0.2)
        put(f"{p}.self_attn.o_proj.weight", (H, H), 0.1)
        for e in range(t.num_experts):  # experts clearly apart: different draws and scales
            s = 0.1 * (1 + 0.5 * e)
            put(f"{p}.mlp.{e}.gate_proj.weight", (inter, H), s)
            put(f"{p}.mlp.{e}.up_proj.weight", (inter, H), s)
            put(f"{p}.mlp.{e}.down_proj.weight", (H, inter), s)
        put(f"{p}.input_layernorm.weight", (H,), 0.1, 1.0)
        put(f"{p}.post_attention_layernorm.weight", (H,), 0.1, 1.0)
    put("model.norm.weight", (H,), 0.1, 1.0)
    put("lm_head.weight", (V, H), 0.1)

    D, C, P, T = v.hidden_size, v.num_channels, v.patch_size, v.num_patches
    put(f"{TOWER}.embeddings.patch_embedding.weight", (D, C, P, P), 0.05)
    put(f"{TOWER}.embeddings.patch_embedding.bias", (D,), 0.1)
    put(f"{TOWER}.embeddings.position_embedding.weight", (T, D), 0.3)
    for i in range(v.num_hidden_layers):
        p = f"{TOWER}.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            put(f"{p}.self_attn.{proj}.weight", (D, D), 0.15)
            put(f"{p}.self_attn.{proj}.bias", (D,), 0.1)
        for ln in ("layer_norm1", "layer_norm2"):
            put(f"{p}.{ln}.weight", (D,), 0.1, 1.0)
            put(f"{p}.{ln}.bias", (D,), 0.1)
        put(f"{p}.mlp.fc1.weight", (v.intermediate_size, D), 0.2)
        put(f"{p}.mlp.fc1.bias", (v.intermediate_size,), 0.1)
        put(f"{p}.mlp.fc2.weight", (D, v.intermediate_size), 0.2)
        put(f"{p}.mlp.fc2.bias", (D,), 0.1)
    put(f"{TOWER}.post_layernorm.weight", (D,), 0.1, 1.0)
    put(f"{TOWER}.post_layernorm.bias", (D,), 0.1)
    put("model.mm_projector.0.weight", (H, D), 0.2)
    put("model.mm_projector.0.bias", (H,), 0.1)
    put("model.mm_projector.2.weight", (H, H), 0.2)
    put("model.mm_projector.2.bias", (H,), 0.1)
    put("model.image_newline", (H,), 0.1)
    return w


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _export(folder: Path, cfg: RSUniVLMConfig, weights: dict[str, np.ndarray], dtype: str) -> WeightStore:
    store = WeightStore(folder)
    save_graph(build_vision_graph(cfg, weights, store, dtype), folder / VISION_ONNX)
    store_embedding_table(cfg, weights, store, dtype)
    for e in range(cfg.text.num_experts):
        save_graph(build_decoder_graph(cfg, weights, e, store, dtype), folder / expert_onnx(e))
    return store


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return _random_weights(CFG)


@pytest.fixture(scope="module")
def bundle32(tmp_path_factory: pytest.TempPathFactory, weights: dict[str, np.ndarray]) -> tuple[Path, WeightStore]:
    folder = tmp_path_factory.mktemp("bundle_fp32")
    return folder, _export(folder, CFG, weights, "float32")


@pytest.fixture(scope="module")
def bundle16(tmp_path_factory: pytest.TempPathFactory, weights: dict[str, np.ndarray]) -> Path:
    folder = tmp_path_factory.mktemp("bundle_fp16")
    _export(folder, CFG, weights, "float16")
    return folder


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    n = SEQ + DECODE_STEPS
    return {
        "embeds": rng.standard_normal((2, n, TEXT.hidden_size)).astype(np.float32),
        "pos": np.tile(np.arange(POS0, POS0 + n, dtype=np.int64), (2, 1)),
        "pixels": rng.uniform(-1, 1, (2, 3, VISION.image_size, VISION.image_size)).astype(np.float32),
    }


def _empty_past(batch: int, dtype: type = np.float32) -> dict[str, np.ndarray]:
    shape = (batch, TEXT.num_key_value_heads, 0, TEXT.head_dim)
    return {n: np.zeros(shape, dtype) for i in range(TEXT.num_hidden_layers) for n in past_names(i)}


def _step(sess: ort.InferenceSession, embeds: np.ndarray, pos: np.ndarray, past: dict[str, np.ndarray]):
    outs = sess.run(None, {"inputs_embeds": embeds, "position_ids": pos, **past})
    names = [o.name for o in sess.get_outputs()]
    res = dict(zip(names, outs, strict=True))
    nxt = {p: res[p.replace("past_key_values", "present")] for p in past}
    return res["logits"], nxt


def _run_decode(sess: ort.InferenceSession, embeds: np.ndarray, pos: np.ndarray) -> tuple[list, dict]:
    """Prefill SEQ tokens from an empty past, then DECODE_STEPS 1-token steps on the graph's own presents."""
    logits, past = _step(sess, embeds[:, :SEQ], pos[:, :SEQ], _empty_past(embeds.shape[0], embeds.dtype))
    all_logits = [logits]
    for j in range(SEQ, SEQ + DECODE_STEPS):
        logits, past = _step(sess, embeds[:, j : j + 1], pos[:, j : j + 1], past)
        all_logits.append(logits)
    return all_logits, past


def _hf_decoder(weights: dict[str, np.ndarray], expert: int, text: TextConfig = TEXT) -> Qwen2ForCausalLM:
    hf_cfg = Qwen2Config(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        rms_norm_eps=text.rms_norm_eps,
        rope_theta=text.rope_theta,
        max_position_embeddings=text.max_position_embeddings,
        tie_word_embeddings=text.tie_word_embeddings,
    )
    hf_cfg._attn_implementation = "eager"
    model = Qwen2ForCausalLM(hf_cfg).eval()
    sd = {}
    for k in model.state_dict():
        src = k.replace(".mlp.", f".mlp.{expert}.")
        if k == "lm_head.weight" and text.tie_word_embeddings:
            src = EMBED_TOKENS
        sd[k] = torch.from_numpy(weights[src])
    model.load_state_dict(sd, strict=True)
    return model


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# -- vision --------------------------------------------------------------------------------------------------


def test_vision_matches_siglip_and_projector(bundle32, weights, inputs) -> None:
    folder, _ = bundle32
    vc = SiglipVisionConfig(
        hidden_size=VISION.hidden_size,
        intermediate_size=VISION.intermediate_size,
        num_hidden_layers=VISION.num_hidden_layers,
        num_attention_heads=VISION.num_attention_heads,
        patch_size=VISION.patch_size,
        image_size=VISION.image_size,
        layer_norm_eps=VISION.layer_norm_eps,
        hidden_act=VISION.hidden_act,
        vision_use_head=False,
    )
    tower = SiglipVisionModel(vc).eval()
    prefix = TOWER.removesuffix("vision_model")
    tower.load_state_dict(
        {
            k: torch.from_numpy(weights[prefix + ("" if k.startswith("vision_model.") else "vision_model.") + k])
            for k in tower.state_dict()
        }
    )
    proj = torch.nn.Sequential(
        torch.nn.Linear(VISION.hidden_size, TEXT.hidden_size),
        torch.nn.GELU(),
        torch.nn.Linear(TEXT.hidden_size, TEXT.hidden_size),
    )
    proj.load_state_dict({k: torch.from_numpy(weights[f"model.mm_projector.{k}"]) for k in proj.state_dict()})
    with torch.no_grad():
        feats = tower(pixel_values=torch.from_numpy(inputs["pixels"]), output_hidden_states=True).hidden_states[-1]
        ref = proj(feats).numpy()

    (got,) = _session(folder / VISION_ONNX).run(None, {"pixel_values": inputs["pixels"]})
    assert got.shape == (2, VISION.num_patches, TEXT.hidden_size)
    assert _max_diff(got, ref) <= 1e-4
    (one,) = _session(folder / VISION_ONNX).run(None, {"pixel_values": inputs["pixels"][:1]})
    assert _max_diff(one, ref[:1]) <= 1e-4


# -- decoder -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expert", range(TEXT.num_experts))
def test_decoder_expert_matches_qwen2(bundle32, weights, inputs, expert: int) -> None:
    folder, _ = bundle32
    sess = _session(folder / expert_onnx(expert))
    assert [i.name for i in sess.get_inputs()] == decoder_input_names(TEXT.num_hidden_layers)
    assert [o.name for o in sess.get_outputs()] == decoder_output_names(TEXT.num_hidden_layers)

    model = _hf_decoder(weights, expert)
    with torch.no_grad():
        out = model(
            inputs_embeds=torch.from_numpy(inputs["embeds"]),
            position_ids=torch.from_numpy(inputs["pos"]),
            use_cache=True,
        )
    ref_logits = out.logits.numpy()
    cache = out.past_key_values

    logits, past = _run_decode(sess, inputs["embeds"], inputs["pos"])
    for step, got in enumerate(logits):
        assert got.shape == (2, TEXT.vocab_size) and got.dtype == np.float32
        assert _max_diff(got, ref_logits[:, SEQ - 1 + step]) <= 1e-4, f"step {step}"
    for i in range(TEXT.num_hidden_layers):
        k, v = past_names(i)
        assert _max_diff(past[k], cache.layers[i].keys.numpy()) <= 1e-4
        assert _max_diff(past[v], cache.layers[i].values.numpy()) <= 1e-4

    # A prefill in two chunks (4 then 3 tokens) equals the one-shot prefill.
    e, p = inputs["embeds"], inputs["pos"]
    one_logits, one_past = _step(sess, e[:, :SEQ], p[:, :SEQ], _empty_past(2))
    _, half = _step(sess, e[:, :4], p[:, :4], _empty_past(2))
    two_logits, two_past = _step(sess, e[:, 4:SEQ], p[:, 4:SEQ], half)
    assert _max_diff(two_logits, one_logits) <= 1e-5
    assert all(_max_diff(two_past[n], one_past[n]) <= 1e-5 for n in one_past)


def test_experts_differ(bundle32, inputs) -> None:
    folder, _ = bundle32
    e, p = inputs["embeds"][:, :SEQ], inputs["pos"][:, :SEQ]
    logits = [_step(_session(folder / expert_onnx(x)), e, p, _empty_past(2))[0] for x in range(TEXT.num_experts)]
    for a in range(len(logits)):
        for b in range(a + 1, len(logits)):
            assert _max_diff(logits[a], logits[b]) > 0.1


def test_fp16_graphs_stay_close_to_fp32(bundle32, bundle16, inputs) -> None:
    folder32, _ = bundle32
    (ref,) = _session(folder32 / VISION_ONNX).run(None, {"pixel_values": inputs["pixels"]})
    (got,) = _session(bundle16 / VISION_ONNX).run(None, {"pixel_values": inputs["pixels"].astype(np.float16)})
    assert got.dtype == np.float16 and _max_diff(got, ref) <= 2e-2

    for expert in range(TEXT.num_experts):
        ref_logits, ref_past = _run_decode(_session(folder32 / expert_onnx(expert)), inputs["embeds"], inputs["pos"])
        sess16 = _session(bundle16 / expert_onnx(expert))
        logits, past = _run_decode(sess16, inputs["embeds"].astype(np.float16), inputs["pos"])
        for a, b in zip(logits, ref_logits, strict=True):
            assert a.dtype == np.float32 and _max_diff(a, b) <= 2e-2, f"expert {expert}"
        for n in ref_past:
            assert past[n].dtype == np.float16 and _max_diff(past[n], ref_past[n]) <= 2e-2


def _external_tensors(folder: Path) -> dict[str, dict[str, tuple[str, int, int]]]:
    """name -> (location, offset, length) of every external initializer, per .onnx file."""
    out = {}
    for path in sorted(folder.glob("*.onnx")):
        model = onnx.load(str(path), load_external_data=False)
        graph = {}
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                d = {e.key: e.value for e in t.external_data}
                graph[t.name] = (d["location"], int(d["offset"]), int(d["length"]))
        out[path.name] = graph
    return out


def test_weights_are_stored_once(bundle32, weights) -> None:
    folder, store = bundle32
    graphs = _external_tensors(folder)
    assert set(graphs) == {VISION_ONNX, *(expert_onnx(e) for e in range(TEXT.num_experts))}

    # A tensor name means one region of one file, whichever graph references it.
    regions: dict[str, tuple[str, int, int]] = {}
    for g in graphs.values():
        for name, where in g.items():
            assert regions.setdefault(name, where) == where, name
    rec = store.record(EMBED_TOKENS)  # untied: read only by the runtime's embedding lookup
    regions[EMBED_TOKENS] = (rec.file, rec.offset, rec.nbytes)

    # The regions tile each file without overlap; the gaps are alignment padding only.
    bins = sorted(p.name for p in folder.glob("*.bin"))
    assert bins == sorted([DECODER_SHARED_BIN, "vision.bin", *(expert_bin(e) for e in range(TEXT.num_experts))])
    for file in bins:
        spans = sorted((off, ln) for loc, off, ln in regions.values() if loc == file)
        end = 0
        for off, ln in spans:
            assert off >= end and off - end < 4096 and off % (4096 if ln >= 4096 else 64) == 0
            end = off + ln
        assert (folder / file).stat().st_size == end

    # Distinct tensor bytes = bytes of every checkpoint tensor the graphs use (fp32: no tensor stored twice).
    used = sum(a.nbytes for k, a in weights.items() if not any(u in k for u in UNUSED))
    assert sum(ln for _, _, ln in regions.values()) == used

    # The three decoders share every decoder_shared.bin tensor and nothing else.
    decs = [graphs[expert_onnx(e)] for e in range(TEXT.num_experts)]
    shared = set(decs[0]).intersection(*decs[1:])
    assert {regions[n][0] for n in shared} == {DECODER_SHARED_BIN}
    for e, g in enumerate(decs):
        assert {g[n][0] for n in set(g) - shared} == {expert_bin(e)}

    # The manifest record of the embedding table reads back the table.
    table = np.memmap(folder / rec.file, dtype=rec.dtype, mode="r", offset=rec.offset, shape=rec.shape)
    np.testing.assert_array_equal(table, weights[EMBED_TOKENS])


def test_tied_lm_head_reuses_embedding_table(tmp_path: Path, weights, inputs) -> None:
    text = replace(TEXT, tie_word_embeddings=True)
    cfg = replace(CFG, text=text)
    tied = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    store = WeightStore(tmp_path)
    rec = store_embedding_table(cfg, tied, store, "float32")
    save_graph(build_decoder_graph(cfg, tied, 1, store, "float32"), tmp_path / expert_onnx(1))
    assert store.record(EMBED_TOKENS) == rec
    assert sum(1 for f, n in store.records() if n == EMBED_TOKENS) == 1

    e, p = inputs["embeds"][:, :SEQ], inputs["pos"][:, :SEQ]
    logits, _ = _step(_session(tmp_path / expert_onnx(1)), e, p, _empty_past(2))
    with torch.no_grad():
        ref = _hf_decoder(tied, 1, text)(inputs_embeds=torch.from_numpy(e), position_ids=torch.from_numpy(p)).logits
    assert _max_diff(logits, ref[:, -1].numpy()) <= 1e-4


def test_weight_store_alignment_and_reuse(tmp_path: Path) -> None:
    store = WeightStore(tmp_path)
    small = np.arange(3, dtype=np.float32)
    big = np.ones((32, 64), np.float32)  # 8 KiB
    t1 = store.tensor("a", small, file="x.bin")
    t2 = store.tensor("b", big, file="x.bin")
    t3 = store.tensor("c", small, file="x.bin")
    assert store.tensor("a", small, file="x.bin") == t1
    offsets = [store.record(n).offset for n in "abc"]
    assert offsets == [0, 4096, 4096 + 8192]
    assert (tmp_path / "x.bin").stat().st_size == 4096 + 8192 + 12
    assert {e.key: e.value for e in t3.external_data} == {
        "location": "x.bin",
        "offset": "12288",
        "length": "12",
    }
    assert t2.data_location == onnx.TensorProto.EXTERNAL and list(t2.dims) == [32, 64]
    with pytest.raises(ValueError):
        store.tensor("a", big, file="x.bin")


def test_bad_inputs_are_named(tmp_path: Path, weights) -> None:
    store = WeightStore(tmp_path)
    with pytest.raises(OptionError):
        build_decoder_graph(CFG, weights, 3, store)
    with pytest.raises(OptionError):
        build_decoder_graph(CFG, weights, 0, store, "bfloat16")
    broken = dict(weights)
    del broken["model.layers.1.mlp.2.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.2\.up_proj\.weight"):
        build_decoder_graph(CFG, broken, 2, WeightStore(tmp_path / "b"))
