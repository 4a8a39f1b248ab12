"""The scatter-shared decoder form: one capacity-long KV buffer per layer written in place with ScatterElements,
attention as plain MatMuls over the whole buffer with a mask of the positions (constant shapes per request).
It must answer exactly like the reference, write only the new rows, and take long prompts in chunks."""

from __future__ import annotations

import numpy as np
import pytest

from rsedge.runtime.pipeline import Pipeline
from tests.test_parity import NEW_TOKENS, PROMPTS, SINGLE, reference_answer


@pytest.fixture(scope="module")
def scatter_bundle(tiny_checkpoint, tmp_path_factory):
    from rsedge.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "scatter"
    manifest = export_bundle(tiny_checkpoint, out, precision="fp32", attention="scatter-shared")
    assert manifest["graphs"]["decoder"]["kv_cache"] == "shared"
    return out


@pytest.mark.parametrize("tag", ["[VG]", "[SEG]", "[CAP]"])
def test_answers_like_the_reference(scatter_bundle, tiny_reference, samples, tag) -> None:
    pipe = Pipeline.load(scatter_bundle)
    paths = [samples / SINGLE[tag]]
    ans = pipe.generate(paths, PROMPTS[tag], max_new_tokens=NEW_TOKENS, keep_logits=True, ignore_eos=True)
    ref_tokens, ref_logits = reference_answer(tiny_reference, pipe, paths, PROMPTS[tag], ans.expert)
    assert ans.tokens == ref_tokens
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(ans.step_logits, ref_logits, strict=True)) <= 1e-4


def test_writes_only_the_new_rows(scatter_bundle) -> None:
    pipe = Pipeline.load(scatter_bundle)
    dec = pipe.decoder(0)
    hidden = pipe.bundle.model["text"]["hidden_size"]
    state = dec.new_state(12)
    rng = np.random.default_rng(0)
    dec.step(rng.standard_normal((1, 5, hidden)).astype(np.float32), state)
    dec.step(rng.standard_normal((1, 1, hidden)).astype(np.float32), state)
    kv = state.cache.memory.view(np.float32).reshape(pipe.layers, 2, pipe.kv_heads, 12, pipe.head_dim)
    assert np.all(np.abs(kv[:, :, :, :6]).sum(-1) > 0)  # every layer's K and V rows 0..5 written ...
    assert not np.any(kv[:, :, :, 6:])  # ... nothing after them


def test_long_prompts_in_chunks(scatter_bundle, monkeypatch) -> None:
    import rsedge.runtime.pipeline as pipeline

    pipe = Pipeline.load(scatter_bundle)
    dec = pipe.decoder(1)
    embeds = (np.random.default_rng(1).standard_normal((1, 40, pipe.bundle.model["text"]["hidden_size"])) * 0.1)
    embeds = embeds.astype(np.float32)
    whole = pipe.prefill(dec, embeds, dec.new_state(41)).copy()
    monkeypatch.setattr(pipeline, "PREFILL_CHUNK", 16)
    chunked = pipe.prefill(dec, embeds, dec.new_state(41))
    np.testing.assert_allclose(chunked, whole, atol=1e-4)
