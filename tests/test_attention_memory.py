"""Memory of the portable decoder's attention: the mask is [S, T] whatever the head count, the scores of one
call are held at most twice, and a bundle advertises only the context a one-call prefill can serve."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from rsedge.export.decoder_graph import ROPE_CACHE_POSITIONS, build_decoder_graph
from rsedge.export.onnx_builder import save_graph
from rsedge.export.weight_store import WeightStore
from rsedge.models.rsunivlm.config import TextConfig

# Qwen2-0.5B's attention (14 query heads over 2 KV heads of 64) with a narrow MLP and vocabulary, so the
# scores are most of what a prefill allocates.
TEXT = TextConfig(
    vocab_size=64,
    hidden_size=896,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=14,
    num_key_value_heads=2,
    num_experts=1,
)
PROMPT = 2048

PREFILL = """
import json, sys
import numpy as np, onnxruntime as ort
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
sess = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
s = int(sys.argv[2])
x = np.random.default_rng(0).standard_normal((1, s, 896)).astype(np.float32)
empty = np.zeros((1, 2, 0, 64), np.float32)
feeds = {"inputs_embeds": x, "position_ids": np.arange(s)[None]}
feeds |= {"past_key_values.0.key": empty, "past_key_values.0.value": empty}
before = hwm()
sess.run(None, feeds)
print(json.dumps({"before": before, "peak": hwm()}))
"""


def _weights(text: TextConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    H, inter, hd = text.hidden_size, text.intermediate_size, text.head_dim
    rows = {"q": text.num_attention_heads * hd, "k": text.num_key_value_heads * hd, "v": text.num_key_value_heads * hd}
    w = {
        "model.embed_tokens.weight": rng.standard_normal((text.vocab_size, H)),
        "lm_head.weight": rng.standard_normal((text.vocab_size, H)) / 30,
        "model.norm.weight": np.ones(H),
        "model.layers.0.input_layernorm.weight": np.ones(H),
        "model.layers.0.post_attention_layernorm.weight": np.ones(H),
        "model.layers.0.self_attn.o_proj.weight": rng.standard_normal((H, H)) / 30,
        "model.layers.0.mlp.0.gate_proj.weight": rng.standard_normal((inter, H)) / 30,
        "model.layers.0.mlp.0.up_proj.weight": rng.standard_normal((inter, H)) / 30,
        "model.layers.0.mlp.0.down_proj.weight": rng.standard_normal((H, inter)) / 8,
    }
    for p, n in rows.items():
        w[f"model.layers.0.self_attn.{p}_proj.weight"] = rng.standard_normal((n, H)) / 30
        w[f"model.layers.0.self_attn.{p}_proj.bias"] = np.zeros(n)
    return {k: v.astype(np.float32) for k, v in w.items()}


def test_prefill_holds_the_scores_at_most_twice(tmp_path: Path) -> None:
    """A one-call prefill of S tokens: 4 bytes per (query, key, head) of scores are inherent, and onnxruntime
    holds Softmax's input and output at once. A mask tiled per query head, or a masking op that copies the
    scores, shows as a third scores-sized buffer (the Tile graph peaked at 3.2x, measured)."""
    graph = build_decoder_graph(TEXT, _weights(TEXT), 0, WeightStore(tmp_path), "float32")
    assert "Tile" not in {n.op_type for n in graph.graph.node}
    save_graph(graph, tmp_path / "decoder.onnx")
    out = subprocess.run(
        [sys.executable, "-c", PREFILL, str(tmp_path / "decoder.onnx"), str(PROMPT)],
        capture_output=True,
        text=True,
        check=True,
    )
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    scores = 4 * TEXT.num_attention_heads * PROMPT * PROMPT
    grown = mem["peak"] - mem["before"]
    assert grown < 2.5 * scores, f"prefill grew {grown / 1e6:.0f} MB; one scores tensor is {scores / 1e6:.0f} MB"


def test_portable_bundle_advertises_what_a_prefill_can_serve(tiny_bundle) -> None:
    """The checkpoint says 32768 positions; a one-call prefill that long would hold 120 GB of scores at full
    size, so a portable bundle, like a fused one, advertises the bound the runtime enforces."""
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["model"]["text"]["max_position_embeddings"] == 32768
    decoder = manifest["graphs"]["decoder"]
    assert decoder["attention"] == "standard"
    assert decoder["max_positions"] == ROPE_CACHE_POSITIONS == 8192
    graph = onnx.load(str(tiny_bundle / decoder["experts"]["0"]["file"]), load_external_data=False).graph
    assert "Tile" not in {n.op_type for n in graph.node}


def test_long_prompts_go_in_chunks_with_the_same_answer(tiny_bundle, monkeypatch) -> None:
    """A prompt longer than PREFILL_CHUNK is fed in calls of that many tokens (linear memory) and gives
    the logits of one call."""
    import numpy as np

    import rsedge.runtime.pipeline as pipeline
    from rsedge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(tiny_bundle)
    dec = pipe.decoder(0)
    rng = np.random.default_rng(0)
    embeds = (rng.standard_normal((1, 50, pipe.bundle.model["text"]["hidden_size"])) * 0.1).astype(dec.dtype)
    whole = pipe.prefill(dec, embeds, dec.new_state(51)).copy()
    calls: list[int] = []
    step = dec.step
    monkeypatch.setattr(dec, "step", lambda e, s: calls.append(e.shape[1]) or step(e, s))
    monkeypatch.setattr(pipeline, "PREFILL_CHUNK", 16)
    state = dec.new_state(51)
    chunked = pipe.prefill(dec, embeds, state)
    assert calls == [16, 16, 16, 2] and state.length == 50
    np.testing.assert_allclose(chunked, whole, atol=1e-4)
