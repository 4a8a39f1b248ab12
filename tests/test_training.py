"""The training script is deterministic: same seed, same weights (what makes the demo model reproducible)."""

from __future__ import annotations

import json
import math
from pathlib import Path

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
SPECIAL = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}


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


def test_dense_targets_follow_the_towers_token_order():
    """Token t of the tower covers patch (t // grid, t % grid); the dense targets put each patch's truth there."""
    import numpy as np

    from rsedge.models.rsunivlm.config import RSUniVLMConfig
    from rsedge.synth.scenes import LABEL_INDEX, OBJECT_CLASSES
    from rsedge.synth.tasks import make_sample
    from rsedge.training.dense import SUB, dense_target
    from rsedge.training.train import model_config

    cfg = TrainConfig(**MICRO)
    grid = cfg.image_size // cfg.patch_size
    model = RSUniVLMForCausalLM(RSUniVLMConfig.from_dict(model_config(cfg, 400, SPECIAL)))
    embed = model.vision_tower.vision_model.embeddings.patch_embedding
    pixels = torch.zeros(1, 3, cfg.image_size, cfg.image_size)
    pixels[:, :, 16:32, 0:16] = 1.0  # patch row 1, column 0
    changed = (embed(pixels) - embed(torch.zeros_like(pixels))).flatten(2).abs().sum(1)[0]
    assert int(changed.argmax()) == 1 * grid + 0

    sample = make_sample("vg", np.random.default_rng(3), size=128)
    scene = sample.scenes[0]
    target = dense_target(scene, 8)
    side = 8 * SUB
    centres = ((np.arange(side) + 0.5) * 128 / side).astype(int)
    for t in (0, 9, 63):
        r, c = divmod(t, 8)
        expect = scene.mask[np.ix_(centres[r * SUB : (r + 1) * SUB], centres[c * SUB : (c + 1) * SUB])]
        assert np.array_equal(target.labels[t], expect.ravel())
    target_obj = scene.objects[sample.meta["target"]]
    cx, cy = target_obj.center
    t = int(cy // 16) * 8 + int(cx // 16)
    holder = target.objects[t]
    assert holder[0] > 0 and OBJECT_CLASSES[holder[0] - 1] in {o.cls for o in scene.objects}
    same_patch = [o for o in scene.objects if int(o.center[1] // 16) * 8 + int(o.center[0] // 16) == t]
    assert all(o.area <= target_obj.area for o in same_patch)  # this seed's target speaks for its patch
    assert OBJECT_CLASSES[holder[0] - 1] == target_obj.cls
    assert np.abs(holder[2:] - np.asarray(sample.meta["box"])).max() <= 0.5 + 1e-9
    assert (target.objects[:, 0] == 0).sum() + (target.objects[:, 0] > 0).sum() == 64
    assert set(np.unique(target.labels)) <= set(LABEL_INDEX.values())


def test_dense_heads_are_not_written_to_the_checkpoint(two_runs):
    """The auxiliary heads train the visual tokens but the checkpoint holds exactly the declared tensors."""
    from rsedge.models.rsunivlm.config import RSUniVLMConfig
    from rsedge.models.rsunivlm.weights import expected_tensors

    records, root = two_runs
    assert records[0]["train_config"]["dense_weight"] > 0
    cfg = RSUniVLMConfig.from_dict(json.loads((root / "run0" / "config.json").read_text()))
    assert set(load_file(str(root / "run0" / "model.safetensors"))) == set(expected_tensors(cfg))


def test_training_reaches_the_vision_tower_and_connector():
    """The visual tokens are differentiable: a loss on them updates the tower and the connector.

    (Once, encode_images ran under no_grad and the demo model was trained with a frozen random tower.)
    """
    from rsedge.models.rsunivlm.config import RSUniVLMConfig
    from rsedge.training.train import model_config

    cfg = TrainConfig(**MICRO)
    model = RSUniVLMForCausalLM(RSUniVLMConfig.from_dict(model_config(cfg, 400, SPECIAL)))
    model.train()
    feats = model.encode_images(torch.randn(2, 3, cfg.image_size, cfg.image_size))
    feats.square().mean().backward()
    embeddings = model.vision_tower.vision_model.embeddings
    tower = (embeddings.patch_embedding.weight, embeddings.position_embedding.weight)
    for p in (*tower, *model.mm_projector.parameters()):
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)


def test_pointer_targets_and_loss():
    """[VG] rows point at the patches their box covers; the loss is ~0 when the head looks there only."""
    import math

    import numpy as np

    from rsedge.synth.tasks import make_sample
    from rsedge.training.pointer import PointerTarget, box_patches, pointer_loss, pointer_targets

    assert box_patches([0, 0, 12.5, 12.5], 8) == (0,)  # ends on a patch border: one patch
    assert box_patches([10, 10, 30, 14], 8) == (0, 1, 2, 8, 9, 10)
    assert box_patches([99, 99, 100, 100], 8) == (63,)

    vg = make_sample("vg", np.random.default_rng(0))
    cls = make_sample("cls", np.random.default_rng(0))
    ids = [[5, 6, -200, 7, 8], [5, -200, 7]]
    (t,) = pointer_targets([vg, cls], ids, 8)
    assert t.row == 0 and t.image_start == 2 and t.patches == box_patches(vg.meta["box"], 8)

    seq = 12
    labels = torch.full((1, seq), -100)
    labels[0, 9:12] = 1  # three answer tokens, predicted from positions 8..10
    target = PointerTarget(0, image_start=1, patches=(2, 3))
    on_target = torch.zeros(1, 1, seq, seq)
    on_target[0, 0, :, 3:5] = 0.5  # positions 1 + (2, 3)
    assert float(pointer_loss(on_target, labels, [target])) < 1e-5
    uniform = torch.full((1, 1, seq, seq), 1 / seq)
    assert math.isclose(float(pointer_loss(uniform, labels, [target])), -math.log(2 / seq), rel_tol=1e-5)


def test_steered_attention_looks_at_the_target_and_reports_its_own_weights():
    """Steering blends only the supervised heads at the answer rows; the loss sees the unsteered weights."""
    from types import SimpleNamespace

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

    from rsedge.training.pointer import Steering, capture_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    module = SimpleNamespace(layer_idx=1, num_key_value_groups=2, training=False)
    plain_out, plain_w = eager_attention_forward(module, q, k, v, None, 0.5)
    rows = torch.zeros(1, 5, dtype=torch.bool)
    rows[0, 3:] = True
    model = SimpleNamespace(lm=SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa")))
    with capture_attention(model, 1, Steering((0,), rows, torch.tensor([1]), 1.0)) as kept:
        attention = ALL_ATTENTION_FUNCTIONS[model.lm.config._attn_implementation]
        out, w = attention(module, q, k, v, None, 0.5)
    assert model.lm.config._attn_implementation == "sdpa"  # restored
    assert torch.equal(kept[0], plain_w) and torch.equal(w, plain_w)
    assert torch.allclose(out[0, 3:, 0], v[0, 0, 1].expand(2, 4))  # steered head, answer rows: the target
    assert torch.equal(out[0, :3], plain_out[0, :3])  # prompt rows untouched
    assert torch.equal(out[0, :, 1], plain_out[0, :, 1])  # unsupervised head untouched


def test_capture_keeps_the_decoder_causal(tiny_checkpoint):
    """The capturing attention is eager attention: same logits, so no answer token can see the future."""
    from rsedge.training.pointer import capture_attention

    model = RSUniVLMForCausalLM.from_checkpoint(tiny_checkpoint)
    embeds = torch.randn(1, 9, model.cfg.text.hidden_size)
    with torch.no_grad():
        plain = model.lm(inputs_embeds=embeds).logits
        with capture_attention(model, 0) as kept:
            captured = model.lm(inputs_embeds=embeds).logits
    assert torch.allclose(plain, captured, atol=1e-5)
    assert kept[0][0, :, 0, 1:].abs().max() == 0  # the first position attends to itself only


def test_frozen_vision_and_steered_pointer_run(two_runs, tmp_path):
    """--freeze-vision leaves the tower bit for bit as it was; the steered multi-head pointer trains the rest."""
    _, root = two_runs
    cfg = TrainConfig(
        seed=0,
        init_from=str(root / "run0"),
        mix={"vg": 1.0},
        pointer_weight=1.0,
        pointer_heads=(0, 1),
        pointer_centre=True,
        pointer_force=1.0,
        freeze_vision=True,
        log_every=1,
        **MICRO,
    )
    record = train(cfg, tmp_path / "f", log=lambda m: None)
    history = record["loss_history"]
    assert [h["step"] for h in history] == [1, 2, 3]  # every step recorded: the pointer loss cannot go unchecked
    assert all(math.isfinite(h["pointer_loss"]) and h["pointer_loss"] > 0 for h in history)
    before, after = (load_file(str(p / "model.safetensors")) for p in (root / "run0", tmp_path / "f"))
    tower = [k for k in before if k.startswith("model.vision_tower.")]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in tower)


def test_existing_output_is_refused_before_training(tmp_path, monkeypatch):
    """An output folder that exists is refused at the start, not when the weights are written an hour later."""
    from rsedge.errors import OptionError
    from rsedge.training import train as train_mod

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train_mod, "expert_batches", no_training)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OptionError, match="already exists"):
        train(TrainConfig(seed=0, **MICRO), tmp_path / "out", log=lambda m: None)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_stop_after_ends_early_on_the_planned_schedule(tmp_path, monkeypatch):
    """A replayed stage that a time limit cut short: the same steps at the same learning rates as the original."""
    from rsedge.training import train as train_mod

    seen: list[tuple[int, int]] = []
    real_lr = train_mod.lr_at

    def spy(step: int, cfg: TrainConfig) -> float:
        seen.append((step, cfg.steps))
        return real_lr(step, cfg)

    monkeypatch.setattr(train_mod, "lr_at", spy)
    cfg = TrainConfig(seed=0, **{**MICRO, "steps": 5}, stop_after=2)
    record = train(cfg, tmp_path / "s", log=lambda m: None)
    assert record["steps_done"] == 2 and record["train_config"]["stop_after"] == 2
    assert sorted(set(seen)) == [(0, 5), (1, 5)]  # two steps, scheduled over the planned five
    assert record["stream_end"] == 2 * cfg.batch_size * 2


def test_replay_plan_reads_every_stage_of_the_shipped_model():
    """The built-in model's record names six stages; their configs are the recorded ones, chained in order."""
    from dataclasses import asdict

    from rsedge.demo import BUILTIN_MODEL
    from rsedge.training.replay import replay_plan, stage_records

    record = json.loads((BUILTIN_MODEL / "training_record.json").read_text())
    plan = replay_plan(record, Path("/work-x"))
    stages = stage_records(record)
    assert len(plan) == len(stages) == 6
    for i, ((cfg, out), stage) in enumerate(zip(plan, stages, strict=True)):
        assert out == Path("/work-x") / f"stage{i + 1}"
        assert cfg.init_from == (None if i == 0 else str(Path("/work-x") / f"stage{i}"))
        got = asdict(cfg)
        for key, value in stage["train_config"].items():
            if key not in ("init_from", "time_limit_s", "stop_after"):
                assert got[key] == (tuple(value) if key == "pointer_heads" else value), (i, key)
        done = stage["steps_done"]
        assert (cfg.stop_after or cfg.steps) == done
    assert plan[3][0].stop_after == 1485  # stage 4: stopped by its time limit, replayed by step count
    assert plan[5][0].lr == 4e-4 and plan[5][0].pointer_heads == (0, 1, 2, 3) and plan[5][0].freeze_vision


def test_replay_refuses_a_record_it_cannot_read():
    from rsedge.errors import CheckpointError
    from rsedge.training.replay import replay_plan

    stage = {"train_config": {"seed": 0, "steps": 3, "warp_drive": 1}, "steps_done": 3, "parent": None}
    with pytest.raises(CheckpointError, match="warp_drive"):
        replay_plan(stage, Path("/w"))
    orphan = {"train_config": {"seed": 0, "init_from": "/elsewhere"}, "steps_done": 3, "parent": None}
    with pytest.raises(CheckpointError, match="init_from"):
        replay_plan(orphan, Path("/w"))
