"""scripts/peer_checkpoint.py writes one expert as a plain Qwen2 checkpoint that transformers loads and that
computes what the RSUniVLM reference computes with that expert routed (the peers run identical weights)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "peer_checkpoint.py"


@pytest.mark.parametrize("expert", [0, 2])
def test_expert_as_qwen2_matches_the_reference(tiny_checkpoint, tiny_reference, tmp_path, expert) -> None:
    from transformers import Qwen2ForCausalLM

    spec = importlib.util.spec_from_file_location("peer_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.write_qwen2(tiny_checkpoint, tmp_path / "qwen2", expert)
    qwen = Qwen2ForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        got = qwen(input_ids=ids).logits[0, -1]
        want = tiny_reference.step(tiny_reference.lm.model.embed_tokens(ids), expert).logits[0, -1]
    # the peer checkpoint is stored in fp16, as the peers' converters read it
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
    assert not torch.allclose(got, tiny_reference.step(tiny_reference.lm.model.embed_tokens(ids), 1).logits[0, -1])
