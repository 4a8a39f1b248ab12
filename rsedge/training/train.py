"""Train the small RSUniVLM-architecture demo model on procedural scenes and the real samples.

Each task is routed to its expert exactly as the static router does at inference, so every batch is
built from one expert's tasks and runs with that expert active. Seeded end to end; the run records its
data, steps, machine and metrics next to the checkpoint it writes (in the released layout).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from rsedge.fsutil import atomic_folder, refuse_existing
from rsedge.models.rsunivlm.checkpoint import checkpoint_config_dict, write_config_files
from rsedge.models.rsunivlm.config import RSUniVLMConfig
from rsedge.models.rsunivlm.modeling import RSUniVLMForCausalLM
from rsedge.models.rsunivlm.tokenizer_files import train_tokenizer, write_tokenizer_files
from rsedge.models.rsunivlm.weights import expected_tensors
from rsedge.synth.real import real_samples
from rsedge.synth.tasks import TASKS, build_split, iter_samples, task_expert
from rsedge.training.batches import embed_batch, make_batch
from rsedge.training.dense import DenseHeads
from rsedge.training.pointer import capture_attention, pointer_loss, steering


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 2000
    batch_size: int = 24
    lr: float = 1.5e-3
    warmup: int = 100
    weight_decay: float = 0.01
    image_size: int = 128
    patch_size: int = 16
    vision: dict[str, int] = field(
        default_factory=lambda: {
            "hidden_size": 192,
            "intermediate_size": 384,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
        }
    )
    text: dict[str, int] = field(
        default_factory=lambda: {
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    tokenizer_vocab: int = 1024
    tokenizer_samples: int = 4000  # training-split samples whose text the tokenizer is fitted on
    real_fraction: float = 0.05  # share of batches drawn from the real training samples
    eval_per_task: int = 100
    threads: int = 2
    time_limit_s: float | None = None  # stop early (recorded) if a machine is slower than planned
    # End after this many steps, the schedule still planned over ``steps``: replays a run a time limit cut short.
    stop_after: int | None = None
    # Continue from an earlier run of this script (its tokenizer and weights); the data stream resumes
    # after the samples that run consumed, so no training sample is seen twice.
    init_from: str | None = None
    mix: dict[str, float] | None = None  # task mix override (None: rsedge.synth.tasks.DEFAULT_MIX)
    # Weight of the dense auxiliary loss on the visual tokens (rsedge.training.dense); 0 turns it off.
    dense_weight: float = 0.5
    # Weight of the grounding attention supervision (rsedge.training.pointer); 0 turns it off.
    pointer_weight: float = 0.0
    pointer_layer: int = -2  # which decoder layer is supervised (negative: from the top)
    pointer_heads: tuple[int, ...] = (0,)  # its supervised heads
    pointer_centre: bool = False  # point at the object's centre patch only (else every patch of its box)
    # Attention teacher forcing of the supervised heads (rsedge.training.pointer.Steering): initial blend
    # weight towards the target token, annealed linearly to 0 over the first force_fraction of the steps.
    pointer_force: float = 0.0
    force_fraction: float = 0.6
    freeze_vision: bool = False  # keep the vision tower fixed (the connector still trains)
    log_every: int = 50  # steps per loss_history entry (and log line); logging only, the weights do not change


def tokenizer_text(seed: int, n: int = 4000) -> list[str]:
    """Prompt and answer text of the training split: what the tokenizer must cover compactly."""
    lines = []
    for s in build_split("train", n, seed=seed):
        lines.extend([s.prompt, s.answer, *s.references])
    lines.extend(x for s in real_samples("train") for x in [s.prompt, s.answer, *s.references])
    return lines


def model_config(cfg: TrainConfig, vocab: int, special: dict[str, int]) -> dict[str, Any]:
    vision = {
        **cfg.vision,
        "patch_size": cfg.patch_size,
        "image_size": cfg.image_size,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu_pytorch_tanh",
    }
    return checkpoint_config_dict(
        text=cfg.text,
        vision=vision,
        tower=f"rsedge/siglip-demo-patch{cfg.patch_size}-{cfg.image_size}",
        vocab_size=vocab,
        special=special,
        dtype="bfloat16",
    )


def expert_batches(cfg: TrainConfig, tok, end_id: int, start: int = 0) -> Iterator:
    """Endless batches, each from the tasks of one expert; the expert mix follows the task mix."""
    rng = random.Random(cfg.seed)
    pools: dict[int, list] = {e: [] for e in range(3)}
    real = real_samples("train")
    stream = iter_samples("train", cfg.seed, mix=cfg.mix, start=start)
    patches = cfg.image_size // cfg.patch_size
    grid = patches if cfg.dense_weight > 0 else None
    pgrid = patches if cfg.pointer_weight > 0 else None
    while True:
        if real and rng.random() < cfg.real_fraction:
            picks = [rng.choice(real) for _ in range(cfg.batch_size)]
            expert = task_expert(picks[0].task)
            picks = [p for p in picks if task_expert(p.task) == expert]
            yield make_batch(picks, tok, cfg.image_size, expert, end_id, grid, pgrid)
            continue
        while True:
            s = next(stream)
            e = task_expert(s.task)
            pools[e].append(s)
            if len(pools[e]) == cfg.batch_size:
                batch, pools[e] = pools[e], []
                yield make_batch(batch, tok, cfg.image_size, e, end_id, grid, pgrid)
                break


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(model: RSUniVLMForCausalLM, config: dict[str, Any], tok, out: Path, record: dict) -> None:
    """The released layout: config.json, model.safetensors (bf16, as released), tokenizer files."""
    names = {spec.module: name for name, spec in expected_tensors(model.cfg).items()}
    state = {names[k]: v.detach().to(torch.bfloat16).contiguous() for k, v in model.named_parameters()}
    with atomic_folder(out) as tmp:
        special = write_tokenizer_files(tok, tmp)
        assert special["<|im_end|>"] == config["eos_token_id"]
        write_config_files(tmp, config)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")


def train(
    cfg: TrainConfig,
    out: Path,
    log: Callable[[str], None] = print,
    evaluate: Callable[[Path, TrainConfig], dict] | None = None,
) -> dict:
    refuse_existing(out)  # not after an hour of training
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    parent: dict | None = None
    start = 0
    if cfg.init_from is not None:
        src = Path(cfg.init_from)
        parent = json.loads((src / "training_record.json").read_text())
        start = parent.get("stream_end", 2 * parent["samples_seen"])
        tok = Tokenizer.from_file(str(src / "tokenizer.json"))
        config = json.loads((src / "config.json").read_text())
        model = RSUniVLMForCausalLM.from_checkpoint(src)
    else:
        tok = train_tokenizer(cfg.tokenizer_vocab, tokenizer_text(cfg.seed, cfg.tokenizer_samples))
        special = {t: tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
        config = model_config(cfg, tok.get_vocab_size(), special)
        model = RSUniVLMForCausalLM(RSUniVLMConfig.from_dict(config))
    model.lm.config._attn_implementation = "sdpa"  # training speed; eager is the reference at inference
    model.train()
    if cfg.freeze_vision:
        model.vision_tower.requires_grad_(False)
    heads = DenseHeads(model.cfg.text.hidden_size)  # training-only; not part of the checkpoint
    params = [p for p in (*model.parameters(), *heads.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    batches = expert_batches(cfg, tok, tok.token_to_id("<|im_end|>"), start)
    history: list[dict[str, float]] = []
    window: list[float] = []
    aux_window: list[float] = []
    ptr_window: list[float] = []
    steps_done = 0
    for step in range(cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)):
        if cfg.time_limit_s is not None and time.time() - t0 > cfg.time_limit_s:
            log(f"time limit reached at step {step}")
            break
        batch = next(batches)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        for layer in model.lm.model.layers:
            layer.mlp.active = batch.expert
        feats = model.encode_images(batch.pixel_values)
        embeds, mask, labels = embed_batch(model, batch, feats)
        supervised = cfg.pointer_layer % len(model.lm.model.layers)
        steer = None
        if batch.pointer and cfg.pointer_force > 0:
            alpha = cfg.pointer_force * max(0.0, 1 - step / max(1, cfg.force_fraction * cfg.steps))
            steer = steering(batch.pointer, labels, cfg.pointer_heads, alpha)
        watch = capture_attention(model, supervised, steer) if batch.pointer else contextlib.nullcontext([])
        with watch as kept:
            out_ = model.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        loss = out_.loss
        if batch.pointer:
            ptr = pointer_loss(kept[0], labels, batch.pointer, cfg.pointer_heads, cfg.pointer_centre)
            ptr_window.append(float(ptr.detach()))
            loss = loss + cfg.pointer_weight * ptr
        aux = heads.loss(feats, batch.dense) if batch.dense else None
        if aux is not None:
            loss = loss + cfg.dense_weight * aux
            aux_window.append(float(aux.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        window.append(float(out_.loss.detach()))
        steps_done = step + 1
        if steps_done % cfg.log_every == 0:
            aux_mean = float(np.mean(aux_window)) if aux_window else None
            ptr_mean = float(np.mean(ptr_window)) if ptr_window else None
            history.append(
                {
                    "step": steps_done,
                    "loss": float(np.mean(window)),
                    "dense_loss": aux_mean,
                    "pointer_loss": ptr_mean,
                    "elapsed_s": time.time() - t0,
                }
            )
            log(
                f"step {steps_done:5d}  loss {np.mean(window):.4f}  dense {aux_mean or 0:.3f}  "
                f"pointer {ptr_mean or 0:.3f}  lr {lr_at(step, cfg):.2e}  {time.time() - t0:.0f}s"
            )
            window, aux_window, ptr_window = [], [], []
    model.eval()
    model.lm.config._attn_implementation = "eager"
    record = {
        "train_config": asdict(cfg),
        "steps_done": steps_done,
        "samples_seen": steps_done * cfg.batch_size,
        # Synthetic samples drawn (batches are filled per expert, so a few more than seen); a run started with
        # --init-from resumes the stream here.
        "stream_end": start + steps_done * cfg.batch_size * 2,
        "parent": parent,
        "train_seconds": round(time.time() - t0, 1),
        "loss_history": history,
        "data": {
            "synthetic": "rsedge.synth.tasks.iter_samples('train', seed)",
            "tasks": list(TASKS),
            "real": "rsedge.synth.real.real_samples('train')",
            "real_fraction": cfg.real_fraction,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": cfg.threads,
        },
    }
    save_checkpoint(model, config, tok, out, record)
    if evaluate is not None:
        record["metrics"] = evaluate(out, cfg)
        (out / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
