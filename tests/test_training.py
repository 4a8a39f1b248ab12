"""The training script is deterministic: same seed, same weights (what makes the demo model reproducible)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rsedge.models.rsunivlm.modeling import RSUniVLMForCausalLM
from rsedge.training.train import TrainConfig, train

MICRO = dict(
    steps=3,
    batch_size=4,
    warmup=1,
    image_size=32,
    patch_size=16,
    tokenizer_vocab=400,
    tokenizer_samples=60,
    vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
    text={
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    },
)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return [train(TrainConfig(seed=0, **MICRO), root / f"run{k}", log=lambda m: None) for k in (0, 1)], root


def test_same_seed_same_weights(two_runs):
    _, root = two_runs
    a, b = (load_file(str(root / f"run{k}" / "model.safetensors")) for k in (0, 1))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trained_checkpoint_is_in_the_released_layout(two_runs):
    _, root = two_runs
    ckpt = root / "run0"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "llava_qwen_gmoe" and cfg["torch_dtype"] == "bfloat16"
    record = json.loads((ckpt / "training_record.json").read_text())
    assert record["steps_done"] == 3 and record["machine"]["threads"] == 2
    model = RSUniVLMForCausalLM.from_checkpoint(ckpt)  # the strict loader accepts it
    assert model.cfg.text.num_experts == 3


def test_continue_from_an_earlier_run(two_runs, tmp_path):
    """--init-from keeps the tokenizer and config, resumes the data stream and records its parent."""
    _, root = two_runs
    record = train(
        TrainConfig(seed=0, init_from=str(root / "run0"), mix={"vg": 1.0}, **MICRO), tmp_path / "c", log=lambda m: None
    )
    assert record["parent"]["steps_done"] == 3
    assert record["stream_end"] > record["parent"]["stream_end"]
    assert (tmp_path / "c" / "tokenizer.json").read_text() == (root / "run0" / "tokenizer.json").read_text()
    before, after = (load_file(str(p / "model.safetensors")) for p in (root / "run0", tmp_path / "c"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
