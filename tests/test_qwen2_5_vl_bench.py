"""`rsedge bench-decode` on a Qwen2.5-VL bundle: the runtime fed the family's rotary positions for a text-only prompt,
the reference timed through its own ``step`` on transformers' language model; both decode the same tokens (FP32), the
step equals transformers' whole model, and the prompt ids hold no added token (the image pad would need an image)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from rsedge.bench.decode_floor import text_prompt_ids
from rsedge.export.bundle import export_bundle
from rsedge.runtime.pipeline import Pipeline
from tests.qwen2_5_vl_helpers import reference, tiny_checkpoint
from tests.test_bad_input import run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("qwen-bench"))


@pytest.fixture(scope="module")
def fp32_bundle(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qwen-bench-fp32") / "fp32"
    export_bundle(checkpoint, out, precision="fp32", validate=False)
    return out


def test_bench_decode_times_both_engines_on_the_same_tokens(checkpoint, fp32_bundle, tmp_path):
    out = tmp_path / "decode.json"
    res = run("bench-decode", checkpoint, fp32_bundle, "--prompt-tokens", "24", "--steps", "6", "--threads", "1",
              "--json", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    rt, ref = r["results"]
    assert (rt["engine"], ref["engine"]) == ("rsedge runtime (onnxruntime)", "PyTorch reference (eager fp32)")
    assert r["prompt_tokens"] == 24 and r["decode_steps"] == 6 and r["threads"] == 1
    for e in (rt, ref):
        assert e["prefill_ms"] > 0 and e["decode_step_ms_median"] > 0 and len(e["tokens"]) == 6
        assert e["tokens_per_s"] == pytest.approx(1e3 / e["decode_step_ms_median"])
    assert r["runtime_vs_reference_decode_speedup"] == pytest.approx(
        ref["decode_step_ms_median"] / rt["decode_step_ms_median"]
    )
    # FP32: the same greedy tokens, so the runtime read the positions the reference computed (and neither was idle)
    assert rt["tokens"] == ref["tokens"] and len(set(rt["tokens"])) > 1


@torch.no_grad()
def test_what_both_engines_run_equals_transformers_whole_model(checkpoint, fp32_bundle):
    """The reference's step (text positions by default, cache growing) against transformers' own forward of the whole
    sequence (its get_rope_index for text), and the runtime decoder fed the family's decoder_inputs for a text-only
    prompt, as bench_runtime feeds it: logits within 1e-4 at the prefill and each decode step."""
    ids = text_prompt_ids(fp32_bundle, 12)
    more = [5, 17, 40]
    ref = reference(checkpoint)
    embed = ref.lm.model.embed_tokens
    out = ref.step(embed(torch.from_numpy(ids)[None]))
    stepped = [out.logits[0, -1]]
    for tok in more:
        out = ref.step(embed(torch.tensor([[tok]])), out.cache)
        stepped.append(out.logits[0, -1])
    whole = ref.model(input_ids=torch.tensor([[*ids.tolist(), *more]])).logits[0, len(ids) - 1 :]
    assert torch.abs(torch.stack(stepped) - whole).max() <= 1e-5

    pipe = Pipeline.load(fp32_bundle, threads=1)
    dec = pipe.decoder(0)
    state = dec.new_state(len(ids) + len(more))
    state.extra_inputs = pipe.family.decoder_inputs(ids.tolist(), [])
    got = [dec.step(pipe.embed_rows(ids)[None], state).copy()]
    got += [dec.step(pipe.embed_rows([tok])[None], state).copy() for tok in more]
    assert np.abs(np.stack(got).reshape(len(got), -1) - whole.numpy()).max() <= 1e-4


def test_prompt_ids_avoid_added_tokens(fp32_bundle):
    tokenizer = Tokenizer.from_file(str(fp32_bundle / "tokenizer" / "tokenizer.json"))
    added = set(tokenizer.get_added_tokens_decoder())
    manifest = json.loads((fp32_bundle / "manifest.json").read_text())
    vocab = manifest["model"]["text"]["vocab_size"]
    assert manifest["prompt"]["image_token_index"] in added  # the image pad is one of them
    ids = text_prompt_ids(fp32_bundle, 2000)  # 704 ids: a plain draw of 2000 hits every added token
    plain = np.random.default_rng(0).integers(0, vocab, size=2000)
    assert np.isin(plain, list(added)).any() and not np.isin(ids, list(added)).any()
    assert ids.min() >= 0 and ids.max() < vocab
    kept = ~np.isin(plain, list(added))
    assert (ids[kept] == plain[kept]).all()  # only the hits were drawn again
    assert (text_prompt_ids(fp32_bundle, 2000) == ids).all()  # seeded
