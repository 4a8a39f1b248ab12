"""The declared, strict weight map of a VILA-layout checkpoint (UniRS, or VILA-1.5 without the change branch).

Three folders, three tables: ``llm/`` (LlamaForCausalLM names), ``vision_tower/`` (SiglipVisionModel names)
and ``mm_projector/`` (UniRS's ``layers.single.*`` / ``layers.change.*``, or VILA-1.5's ``layers.{1,2,4}.*``).
Each name maps to the reference parameter it fills (None: saved upstream, never used, checked and dropped)
and its shape, derived from the config. The original loads the projector with ``strict=False``
(``multimodal_projector/builder.py`` line 46), so a cc_n_layers mismatch or a VILA-named projector is
ignored silently; here every missing, unexpected or misshapen tensor is named, in one error line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from rsedge.errors import CheckpointError
from rsedge.models.safetensors_files import iter_checkpoint
from rsedge.models.unirs.config import CHANGE_ATTENTION_DIM, LAYOUT_VILA, UniRSConfig

Shape = tuple[int, ...]
FOLDERS = ("llm", "vision_tower", "mm_projector")


@dataclass(frozen=True)
class ExpectedTensor:
    module: str | None  # reference parameter or buffer it fills; None: checked, then dropped
    shape: Shape


def _llm(c: UniRSConfig) -> dict[str, ExpectedTensor]:
    t = c.text
    H, FF, hd = t.hidden_size, t.intermediate_size, t.head_dim
    out = {
        "model.embed_tokens.weight": (t.vocab_size, H),
        "model.norm.weight": (H,),
    }
    if not t.tie_word_embeddings:
        out["lm_head.weight"] = (t.vocab_size, H)
    for i in range(t.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": (t.num_attention_heads * hd, H),
            p + "self_attn.k_proj.weight": (t.num_key_value_heads * hd, H),
            p + "self_attn.v_proj.weight": (t.num_key_value_heads * hd, H),
            p + "self_attn.o_proj.weight": (H, t.num_attention_heads * hd),
            p + "mlp.gate_proj.weight": (FF, H),
            p + "mlp.up_proj.weight": (FF, H),
            p + "mlp.down_proj.weight": (H, FF),
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
        }
    return {k: ExpectedTensor(f"lm.{k}", s) for k, s in out.items()}


def _vision(c: UniRSConfig) -> dict[str, ExpectedTensor]:
    v = c.vision
    D, FF = v.hidden_size, v.intermediate_size
    pre = "vision_model."
    used: dict[str, Shape] = {
        "embeddings.patch_embedding.weight": (D, v.num_channels, v.patch_size, v.patch_size),
        "embeddings.patch_embedding.bias": (D,),
        "embeddings.position_embedding.weight": (v.num_patches, D),
        "post_layernorm.weight": (D,),  # computed upstream, unused (features come from a hidden state)
        "post_layernorm.bias": (D,),
    }
    for i in range(v.num_hidden_layers):
        p = f"encoder.layers.{i}."
        for proj in ("q", "k", "v", "out"):
            used |= {p + f"self_attn.{proj}_proj.weight": (D, D), p + f"self_attn.{proj}_proj.bias": (D,)}
        for norm in ("layer_norm1", "layer_norm2"):
            used |= {p + f"{norm}.weight": (D,), p + f"{norm}.bias": (D,)}
        used |= {
            p + "mlp.fc1.weight": (FF, D),
            p + "mlp.fc1.bias": (FF,),
            p + "mlp.fc2.weight": (D, FF),
            p + "mlp.fc2.bias": (D,),
        }
    # SiglipVisionModel (transformers 4.36) always has the attention-pooling head; VILA saves it, nothing runs it.
    head: dict[str, Shape] = {
        "head.probe": (1, 1, D),
        "head.attention.in_proj_weight": (3 * D, D),
        "head.attention.in_proj_bias": (3 * D,),
        "head.attention.out_proj.weight": (D, D),
        "head.attention.out_proj.bias": (D,),
        "head.layernorm.weight": (D,),
        "head.layernorm.bias": (D,),
        "head.mlp.fc1.weight": (FF, D),
        "head.mlp.fc1.bias": (FF,),
        "head.mlp.fc2.weight": (D, FF),
        "head.mlp.fc2.bias": (D,),
    }
    out = {pre + k: ExpectedTensor(f"vision_tower.vision_model.{k}", s) for k, s in used.items()}
    return out | {pre + k: ExpectedTensor(None, s) for k, s in head.items()}


def _single(c: UniRSConfig) -> dict[str, Shape]:
    """MultipleApplicationLayers.single: [DownSample, LayerNorm(4C), Linear(4C,H), GELU, Linear(H,H)]."""
    C4, H = 4 * c.mm_hidden_size, c.text.hidden_size
    return {"1.weight": (C4,), "1.bias": (C4,), "2.weight": (H, C4), "2.bias": (H,), "4.weight": (H, H), "4.bias": (H,)}


def _transformer(dim: int, ff: int, heads: int) -> dict[str, Shape]:
    """model_encoder.py Transformer(dim, dim, heads, 512, ff): MultiHeadAtt, FeedForward, two LayerNorms."""
    A = CHANGE_ATTENTION_DIM
    out: dict[str, Shape] = {f"att.to_{p}.weight": (A, dim) for p in "qkv"}  # to_v is saved but never used
    if not (heads == 1 and dim == A):  # MultiHeadAtt.project_out
        out |= {"att.to_out.0.weight": (dim, A), "att.to_out.0.bias": (dim,)}
    out |= {"feedforward.net.0.weight": (ff, dim), "feedforward.net.0.bias": (ff,)}
    out |= {"feedforward.net.3.weight": (dim, ff), "feedforward.net.3.bias": (dim,)}
    return out | {f"norm{n}.{w}": (dim,) for n in (1, 2) for w in ("weight", "bias")}


def _batch_norm(n: int) -> dict[str, Shape]:
    return {"weight": (n,), "bias": (n,), "running_mean": (n,), "running_var": (n,), "num_batches_tracked": ()}


def _change(c: UniRSConfig) -> dict[str, Shape]:
    """AttentiveEncoder(cc_n_layers, [vision_resolution, patch, C], cc_head, C): model_encoder.py lines 103-122."""
    C, g, half = c.mm_hidden_size, c.change_grid, c.mm_hidden_size // 2
    out: dict[str, Shape] = {"h_embedding.weight": (g, half), "w_embedding.weight": (g, half)}
    for i in range(c.cc_n_layers):
        for j, dim in ((0, C), (1, 2 * C)):
            out |= {f"selftrans.{i}.{j}.{k}": s for k, s in _transformer(dim, C, c.cc_head).items()}
    out |= {"Conv1.weight": (C, 2 * C, 1, 1), "Conv1.bias": (C,)}
    # resblock(C, C).left: Conv1x1 C->C/2, BN, ReLU, Conv3x3 C/2->C/2, BN, ReLU, Conv1x1 C/2->C, BN
    out |= {"LN.left.0.weight": (half, C, 1, 1), "LN.left.0.bias": (half,)}
    out |= {f"LN.left.1.{k}": s for k, s in _batch_norm(half).items()}
    out |= {"LN.left.3.weight": (half, half, 3, 3), "LN.left.3.bias": (half,)}
    out |= {f"LN.left.4.{k}": s for k, s in _batch_norm(half).items()}
    out |= {"LN.left.6.weight": (C, half, 1, 1), "LN.left.6.bias": (C,)}
    return out | {f"LN.left.7.{k}": s for k, s in _batch_norm(C).items()}


def _projector(c: UniRSConfig) -> dict[str, ExpectedTensor]:
    if c.projector_layout == LAYOUT_VILA:
        return {f"layers.{k}": ExpectedTensor(f"mm_projector.single.{k}", s) for k, s in _single(c).items()}
    out = {f"layers.single.{k}": ExpectedTensor(f"mm_projector.single.{k}", s) for k, s in _single(c).items()}
    return out | {f"layers.change.{k}": ExpectedTensor(f"mm_projector.change.{k}", s) for k, s in _change(c).items()}


TABLES: dict[str, Callable[[UniRSConfig], dict[str, ExpectedTensor]]] = {
    "llm": _llm,
    "vision_tower": _vision,
    "mm_projector": _projector,
}


def expected_tensors(cfg: UniRSConfig) -> dict[str, dict[str, ExpectedTensor]]:
    """Per folder, every tensor name the checkpoint must hold, with what it fills and its shape."""
    return {folder: table(cfg) for folder, table in TABLES.items()}


def collapse_names(names: Iterable[str]) -> list[str]:
    """Names that differ only in numbers written once, numbers as sets: ``model.layers.{0-31}.mlp.up_proj.weight``.

    Exact: a group is collapsed only when its number sets multiply out to exactly its names.
    """
    groups: dict[str, list[tuple[int, ...]]] = {}
    for n in names:
        groups.setdefault(re.sub(r"(?<=\.)\d+(?=\.)", "#", n), []).append(
            tuple(int(x) for x in re.findall(r"(?<=\.)(\d+)(?=\.)", n))
        )
    out: list[str] = []
    for template, numbers in groups.items():
        slots = [sorted({t[k] for t in numbers}) for k in range(template.count("#"))]
        product = 1
        for s in slots:
            product *= len(s)
        if len(numbers) == 1 or product != len(set(numbers)):
            out.extend(_fill(template, t) for t in numbers)
            continue
        out.append(_fill(template, tuple(_ranges(s) for s in slots)))
    return out


def _fill(template: str, values: tuple[object, ...]) -> str:
    parts = template.split("#")
    return parts[0] + "".join(str(v) + p for v, p in zip(values, parts[1:], strict=True))


def _ranges(values: list[int]) -> str:
    runs: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return runs[0] if len(runs) == 1 and "-" not in runs[0] else "{" + ",".join(runs) + "}"


def load_checkpoint_tensors(path: str | Path, cfg: UniRSConfig) -> dict[str, dict[str, torch.Tensor]]:
    """All tensors of the three folders, checked against the declared map; every problem named in one line."""
    path = Path(path)
    expected = expected_tensors(cfg)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    problems: list[str] = []
    for folder, table in expected.items():
        got: dict[str, torch.Tensor] = {}
        unexpected: list[str] = []
        misshapen: list[str] = []
        for name, t in iter_checkpoint(path / folder):
            spec = table.get(name)
            if spec is None:
                unexpected.append(name)
            elif tuple(t.shape) != spec.shape:
                misshapen.append(f"{name} {tuple(t.shape)} (expected {spec.shape})")
            else:
                got[name] = t
        missing = [n for n in table if n not in got and not any(m.startswith(n + " ") for m in misshapen)]
        for kind, names in (("missing", missing), ("unexpected", unexpected)):
            if names:
                problems.append(f"{folder}: {kind} {', '.join(collapse_names(names))}")
        if misshapen:
            problems.append(f"{folder}: misshapen {', '.join(misshapen)}")
        tensors[folder] = got
    if problems:
        raise CheckpointError(f"{path}: {'; '.join(problems)}{_hint(cfg, problems)}")
    return tensors


def _hint(cfg: UniRSConfig, problems: list[str]) -> str:
    """The usual cause, when the problems are change-transformer layers: cc_n_layers is not in config.json."""
    text = " ".join(problems)
    if "layers.change.selftrans." in text and "unexpected" in text and cfg.cc_n_layers == 0:
        return " (the checkpoint has change-transformer layers: pass its cc_n_layers, which config.json does not save)"
    if "layers.change.selftrans." in text and "missing" in text:
        return f" (cc_n_layers={cfg.cc_n_layers} asks for change-transformer layers the checkpoint lacks)"
    return ""
