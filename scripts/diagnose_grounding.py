#!/usr/bin/env python
"""Where a checkpoint's [VG] grounding breaks: finding the object, or reading its position.

A person runs it (about a minute on 2 CPU cores):
    .venv/bin/python scripts/diagnose_grounding.py rsedge/data/models/rsunivlm-demo
Teacher-forced on synthetic test [VG] samples through the PyTorch reference it prints
1. the attention mass that head 0 of the pointer layer (rsedge.training.pointer) puts on the target's patches;
2. per answer digit, how often the model's top token is the right digit (and within one of it);
3. linear (ridge), MLP and linear-to-101-bins probes from the visual token of the patch holding the
   object's centre to its 0-100 box, fitted on training scenes: how precisely the tokens hold the position.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from rsedge.models.rsunivlm.modeling import RSUniVLMForCausalLM
from rsedge.runtime.preprocess import preprocess_square
from rsedge.synth.tasks import build_split
from rsedge.training.batches import embed_batch, make_batch
from rsedge.training.dense import IGNORE, centre_patch
from rsedge.training.pointer import capture_attention

VG_EXPERT = 1


def attention_and_digits(model, tok, samples, layer: int, grid: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    for block in model.lm.model.layers:
        block.mlp.active = VG_EXPERT
    size = model.cfg.vision.image_size
    batch = make_batch(samples, tok, size, VG_EXPERT, tok.token_to_id("<|im_end|>"), pointer_grid=grid)
    with torch.no_grad():
        embeds, mask, labels = embed_batch(model, batch)
        with capture_attention(model, layer) as kept:
            logits = model.lm(inputs_embeds=embeds, attention_mask=mask).logits
    masses, digits = [], {}
    for t in batch.pointer:
        answer = (labels[t.row] != IGNORE).nonzero().flatten()
        keys = torch.tensor([t.image_start + p for p in t.patches])
        masses.append(float(kept[0][t.row, 0][answer - 1][:, keys].sum(-1).mean()))
        pred = logits[t.row, answer - 1].argmax(-1)
        slot = 0
        for gold, got in zip(labels[t.row, answer].tolist(), pred.tolist(), strict=True):
            g, p = tok.id_to_token(gold), tok.id_to_token(got)
            if g.isdigit():
                digits.setdefault(slot, []).append((p == g, p.isdigit() and abs(int(p) - int(g)) <= 1))
                slot += 1
    return np.array(masses), {k: np.array(v) for k, v in digits.items()}


def centre_tokens(model, split: str, n: int, seed: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    samples = build_split(split, n, seed, mix={"vg": 1.0})
    x, y = [], []
    for i in range(0, n, 64):
        chunk = samples[i : i + 64]
        px = np.stack([preprocess_square(Image.fromarray(s.images[0]), model.cfg.vision.image_size)[0] for s in chunk])
        with torch.no_grad():
            feats = model.encode_images(torch.from_numpy(px))
        for s, f in zip(chunk, feats, strict=True):
            x.append(f[centre_patch(s.meta["box_px"], s.scenes[0].size, grid)].numpy())
            y.append(s.meta["box"])
    return np.array(x), np.array(y, dtype=np.float32)


def fit(net: torch.nn.Module, loss_fn, x: np.ndarray, y: np.ndarray, epochs: int, lr: float) -> torch.nn.Module:
    """Mini-batch Adam, seeded: the training loop both learned probes share."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 256):
            b = perm[i : i + 256]
            loss = loss_fn(net(xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net


def probes(xtr, ytr, xte, yte) -> tuple[np.ndarray, np.ndarray]:
    design = lambda x: np.hstack([x, np.ones((len(x), 1), x.dtype)])  # noqa: E731
    a = design(xtr)
    w = np.linalg.solve(a.T @ a + 1e-2 * np.eye(a.shape[1]), a.T @ ytr)
    ridge = np.abs(design(xte) @ w - yte).mean(0)
    torch.manual_seed(0)  # the MLP's initial weights
    net = torch.nn.Sequential(torch.nn.Linear(xtr.shape[1], 512), torch.nn.GELU(), torch.nn.Linear(512, 4))
    net = fit(net, lambda out, y: (out - y).abs().mean(), xtr, ytr, epochs=300, lr=1e-3)
    with torch.no_grad():
        mlp = (net(torch.from_numpy(xte)) - torch.from_numpy(yte)).abs().mean(0).numpy()
    return ridge, mlp


def bin_probe(xtr, ytr, xte, yte) -> np.ndarray:
    """A linear read-out to 101 bins per coordinate, as the dense head the tower was trained with."""
    torch.manual_seed(0)  # the head's initial weights
    head = torch.nn.Linear(xtr.shape[1], 4 * 101)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(out.reshape(-1, 101), y.reshape(-1))

    head = fit(head, loss_fn, xtr, np.rint(ytr).astype(np.int64), epochs=100, lr=3e-3)
    with torch.no_grad():
        p = head(torch.from_numpy(xte)).reshape(-1, 4, 101).softmax(-1)
        expected = (p * torch.arange(101.0)).sum(-1)
    return (expected - torch.from_numpy(yte)).abs().mean(0).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--probe-train", type=int, default=3000)
    ap.add_argument("--probe-test", type=int, default=500)
    ap.add_argument("--layer", type=int, default=-2, help="the pointer-supervised decoder layer")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(2)
    model = RSUniVLMForCausalLM.from_checkpoint(a.checkpoint)
    model.eval()
    tok = Tokenizer.from_file(str(a.checkpoint / "tokenizer.json"))
    grid = model.cfg.vision.image_size // model.cfg.vision.patch_size
    layer = a.layer % len(model.lm.model.layers)
    samples = build_split("test", a.samples, a.seed, mix={"vg": 1.0})
    masses, digits = attention_and_digits(model, tok, samples, layer, grid)
    print(f"attention of layer {layer} head 0 on the target's patches: mean {masses.mean():.3f}")
    names = ["x1", "y1", "x2", "y2"]
    for k in sorted(digits)[:8]:
        d = digits[k]
        name = f"{names[k // 2]} {'tens' if k % 2 == 0 else 'units'}"
        print(f"digit {k} ({name}, if two-digit): right {d[:, 0].mean():.2f}, within one {d[:, 1].mean():.2f}")
    xtr, ytr = centre_tokens(model, "train", a.probe_train, a.seed, grid)
    xte, yte = centre_tokens(model, "test", a.probe_test, a.seed, grid)
    ridge, mlp = probes(xtr, ytr, xte, yte)
    print(f"box from the centre patch's visual token, mean |error| in points (x1 y1 x2 y2): ridge {ridge.round(2)}")
    print(f"  MLP probe {mlp.round(2)}")
    print(f"  linear probe to 101 bins per coordinate {bin_probe(xtr, ytr, xte, yte).round(2)}")


if __name__ == "__main__":
    main()
