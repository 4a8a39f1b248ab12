"""Where two onnxruntime execution providers disagree on a graph: every intermediate tensor compared.

A bundle that is right on the CPU and wrong on a GPU (or a Jetson) is a provider's kernel disagreeing with
another's. This runs one graph on two providers with every node output exposed, on the same seeded
inputs, and lists the nodes in graph order whose outputs differ, with the op type and the relative error,
so the first bad kernel is named instead of guessed. It also steps a decoder through the runtime's own
backends on both providers (the shared KV buffer is bound as the runtime binds it) and compares logits.

    python scripts/provider_diff.py BUNDLE [--expert 0] [--a cpu] [--b cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def exposed_graph(path: Path) -> Path:
    """A copy of ``path`` beside it (so external weights resolve) with every node output a graph output."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    have = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in have:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
                have.add(name)
    out = path.with_name(f".{path.stem}.exposed.onnx")
    onnx.save(model, str(out))
    return out


def session(path: Path, device: str, optimize: bool) -> Any:
    import onnxruntime as ort

    from rsedge.runtime.sessions import SessionConfig, providers_for

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    chosen = providers_for(SessionConfig(device=device), set(ort.get_available_providers()))
    providers, options = [p for p, _ in chosen], [o for _, o in chosen]
    return ort.InferenceSession(str(path), opts, providers=providers, provider_options=options)


def feeds_for(sess: Any, seq: int, capacity: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for i in sess.get_inputs():
        dtype = DTYPES[i.type]
        if i.name == "inputs_embeds":
            feeds[i.name] = (rng.standard_normal((1, seq, int(i.shape[-1]))) * 0.05).astype(dtype)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(seq, dtype=np.int64)[None]
        else:  # KV: the shared form takes a buffer of its capacity, the portable form an empty past
            dims = [1, int(i.shape[1]), capacity if i.shape[2] == "kv_capacity" else 0, int(i.shape[3])]
            feeds[i.name] = np.zeros(dims, dtype=dtype)
    return feeds


def node_diff(graph: Path, a: str, b: str, optimize: bool, seq: int = 8) -> dict[str, Any]:
    import onnx

    exposed = exposed_graph(graph)
    try:
        sa, sb = session(exposed, a, optimize), session(exposed, b, optimize)
        feeds = feeds_for(sa, seq, capacity=seq + 8)
        names = [o.name for o in sa.get_outputs()]
        outs_a, outs_b = sa.run(names, feeds), sb.run(names, feeds)
    finally:
        exposed.unlink(missing_ok=True)
    producer = {}
    for node in onnx.load(str(graph), load_external_data=False).graph.node:
        for name in node.output:
            producer[name] = (node.op_type, node.name)
    rows = []
    for name, x, y in zip(names, outs_a, outs_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            op = producer.get(name, ("?", "?"))[0]
            rows.append({"output": name, "op": op, "shape_a": x.shape, "shape_b": y.shape})
            continue
        if x.dtype.kind != "f" or x.size == 0:
            if not np.array_equal(x, y):
                rows.append({"output": name, "op": producer.get(name, ("?", "?"))[0], "mismatch": "integer values"})
            continue
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        rel = float(np.max(np.abs(x64 - y64)) / (np.max(np.abs(x64)) + 1e-6))
        if rel > 2e-2 or not np.isfinite(y64).all():
            rows.append({"output": name, "op": producer.get(name, ("?", "?"))[0], "rel_max_diff": rel,
                         "finite_b": bool(np.isfinite(y64).all())})  # fmt: skip
    return {"graph": str(graph), "optimized": optimize, "nodes_compared": len(names), "differing": rows[:25],
            "differing_count": len(rows)}  # fmt: skip


def backend_diff(bundle: Path, expert: int, a: str, b: str, steps: int = 4) -> dict[str, Any]:
    """Prefill + decode steps through the runtime's backends on both devices: logits cosine per step."""
    from rsedge.runtime.pipeline import Pipeline

    pa, pb = Pipeline.load(bundle, device=a, verify="size"), Pipeline.load(bundle, device=b, verify="size")
    da, db = pa.decoder(expert), pb.decoder(expert)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, pa.embed_tokens.shape[0], size=24)
    emb = pa.embed_rows(ids)[None]
    sa, sb = da.new_state(64), db.new_state(64)
    rows = []
    la, lb = da.step(emb.astype(da.dtype), sa).copy(), db.step(emb.astype(db.dtype), sb).copy()
    for k in range(steps + 1):
        cos = float(np.dot(la, lb) / (np.linalg.norm(la) * np.linalg.norm(lb) + 1e-30))
        same = bool(la.argmax() == lb.argmax())
        rows.append({"step": k, "cosine": cos, "max_abs": float(np.max(np.abs(la - lb))), "argmax_equal": same})
        tok = int(la.argmax())
        row = pa.embed_rows([tok])[None]
        la, lb = da.step(row.astype(da.dtype), sa).copy(), db.step(row.astype(db.dtype), sb).copy()
    return {"bundle": str(bundle), "expert": expert, "steps": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--expert", type=int, default=0)
    ap.add_argument("--a", default="cpu")
    ap.add_argument("--b", default="cuda")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from rsedge.runtime.bundle import Bundle

    bundle = Bundle.open(args.bundle, verify="size")
    graph = bundle.path(bundle.graph("decoder")["experts"][str(args.expert)]["file"])
    result: dict[str, Any] = {}
    for label, fn in (
        ("backends", lambda: backend_diff(args.bundle, args.expert, args.a, args.b)),
        ("nodes_unoptimized", lambda: node_diff(graph, args.a, args.b, optimize=False)),
        ("nodes_optimized", lambda: node_diff(graph, args.a, args.b, optimize=True)),
    ):
        try:
            result[label] = fn()
        except Exception as e:  # each part is reported on its own; one failing must not hide the others
            result[label] = {"error": f"{type(e).__name__}: {e}"}
    text = json.dumps(result, indent=1, default=str)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
