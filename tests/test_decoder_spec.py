"""One decoder builder, two families: a dense LLaMA (no q/k/v biases, one MLP per layer: VILA-1.5 / UniRS's
Sheared-LLaMA) is a DecoderSpec of the builder that makes RSUniVLM's Qwen2-with-experts graphs, and its graphs
match transformers' LlamaForCausalLM in every attention form, prefill and decode."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rsedge.errors import OptionError
from rsedge.export.decoder_graph import ATTENTION_IMPLS, SHARED_KV, build_decoder_graph, expert_onnx
from rsedge.export.decoder_spec import DecoderSpec, llama, qwen2_experts
from rsedge.export.onnx_builder import save_graph
from rsedge.export.weight_store import WeightStore
from rsedge.models.rsunivlm.config import TextConfig
from rsedge.runtime.backends import DecoderSpec as RuntimeSpec
from rsedge.runtime.backends import backend_class
from rsedge.runtime.sessions import SessionConfig

TEXT = TextConfig(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=256,
    num_experts=1,
)
PROMPT, STEPS = 9, 6
TOL = 1e-4  # fp32 graph against fp32 eager PyTorch


@pytest.fixture(scope="module")
def reference() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=TEXT.vocab_size,
        hidden_size=TEXT.hidden_size,
        intermediate_size=TEXT.intermediate_size,
        num_hidden_layers=TEXT.num_hidden_layers,
        num_attention_heads=TEXT.num_attention_heads,
        num_key_value_heads=TEXT.num_key_value_heads,
        rms_norm_eps=TEXT.rms_norm_eps,
        rope_theta=TEXT.rope_theta,
        max_position_embeddings=TEXT.max_position_embeddings,
        tie_word_embeddings=False,
        attention_bias=False,
    )
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("attention", ATTENTION_IMPLS)
def test_llama_decoder_matches_transformers(reference, attention, tmp_path):
    weights = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    store = WeightStore(tmp_path)
    graph = build_decoder_graph(llama(TEXT), weights, 0, store, "float32", attention=attention)
    assert not any("bias" in init.name for init in graph.graph.initializer)
    save_graph(graph, tmp_path / expert_onnx(0))
    assert onnx.load(str(tmp_path / expert_onnx(0)), load_external_data=False).doc_string.startswith("LLaMA decoder")

    shared = attention in SHARED_KV
    spec = RuntimeSpec(TEXT.num_hidden_layers, TEXT.num_key_value_heads, TEXT.head_dim, shared_kv=shared)
    dec = backend_class("cpu")(tmp_path / expert_onnx(0), spec, SessionConfig(threads=1))
    embeds = np.random.default_rng(1).standard_normal((1, PROMPT + STEPS, TEXT.hidden_size)).astype(np.float32)
    with torch.no_grad():
        want = reference(inputs_embeds=torch.from_numpy(embeds)).logits[0].numpy()
    state = dec.new_state(PROMPT + STEPS)
    got = [dec.step(embeds[:, :PROMPT], state).copy()]  # a step's logits live in the state's one buffer
    for j in range(PROMPT, PROMPT + STEPS - 1):
        got.append(dec.step(embeds[:, j : j + 1], state).copy())
    for k, logits in enumerate(got):
        np.testing.assert_allclose(logits.reshape(-1), want[PROMPT - 1 + k], atol=TOL, rtol=0)


def test_specs_refuse_what_the_builder_does_not_build():
    with pytest.raises(OptionError, match="dense LLaMA decoder has one MLP per layer, not 3"):
        llama(TextConfig(64, 32, 48, 1, 4, 2))
    with pytest.raises(OptionError, match="activation 'gelu' is not built"):
        DecoderSpec(TEXT, activation="gelu")
    with pytest.raises(OptionError, match="need an MLP name with"):
        DecoderSpec(TextConfig(64, 32, 48, 1, 4, 2), mlp="model.layers.{layer}.mlp")
    assert qwen2_experts(TEXT).qkv_bias and qwen2_experts(TEXT).mlp_prefix(3, 1) == "model.layers.3.mlp.1"
