"""The GPU check of the backends issue, as ONE run on a GPU machine (an H200 here; a Jetson the same way).

For the built-in model and the full-size checkpoint (random weights, made on the machine), it exports the
CUDA target's FP16, INT8 and INT4 bundles, then measures:

- parity on the GPU: every bundle through ``Pipeline(device=...)`` against the PyTorch reference on the
  same GPU, teacher-forced on the bundle's own tokens (so every step compares logits on one prefix):
  logits cosine and max|diff| per step, greedy agreement, and whether the greedy tokens are identical;
- speed and memory (full size, each bundle in a fresh process that never imports torch): vision encoder
  ms, prefill of the ~760-token ``[VG]`` request, decode ms/token at that depth, first and warm whole
  requests of 64 new tokens (and the first request after a warm-up at load), the process's GPU memory
  (``rsedge bench`` in a child process);
- PyTorch FP16 on the same GPU: the reference's vision, prefill and decode, and ``generate``;
- the bandwidth roofline: bytes one decode step must read / the copy bandwidth measured here.

Results go to ``OUT/gpu_check.json`` after every stage (a failing stage is recorded, the rest still run)
and a table is printed at the end. ``--device cpu`` runs the same stages on the CPU (the test suite does,
on a tiny checkpoint), so the script is exercised before the GPU machine is at hand.

    python scripts/gpu_check.py --out OUT [--device cuda] [--skip-full] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "rsedge" / "data" / "models" / "rsunivlm-demo"
SAMPLES = REPO / "rsedge" / "data" / "samples"
# The CUDA target's bundles (rsedge.export.targets: FP16 activations, separate past/present attention,
# FP16 vision tower).
RECIPES = {p: ["--target", "cuda", "--precision", p] for p in ("fp16", "int8", "int4")}
# The shared-buffer form with plain MatMul attention (constant shapes, what CUDA graphs need): checked on the GPU
# beside the target's form, since the GroupQueryAttention shared-buffer form disagreed there.
RECIPES["int4-scatter"] = ["--target", "cuda", "--precision", "int4", "--attention", "scatter-shared"]
PAIR = ("levircc_test_000289_A.png", "levircc_test_000289_B.png")
CASES = [
    (("dior_05863.png",), "[VG] Where is the storage tank?"),
    (("dior_05863.png",), "[REF] what is [1, 20, 9, 30]?"),
    (("aid_storagetanks_207.jpg",), "[CAP] Describe this image briefly."),
    (("dota_P0075.png",), "[VQA] How many storage tanks are there?"),
    (("aid_storagetanks_207.jpg",), "[CLS] What is the category of this image?"),
    (("dota_P0075.png",), "[SEG] building."),
    (PAIR, "[CCD] Please briefly describe the changes in these two images."),
]
BENCH_CASE = (("dior_05863.png",), "[VG] Where is the storage tank?")
DATASHEET_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stage(results: dict[str, Any], out: Path, name: str, fn: Callable[[], Any]) -> Any:
    """Run one stage; its result (or its error) goes into ``results`` and the JSON is rewritten."""
    log(f"{name} ...")
    t0 = time.perf_counter()
    try:
        value = fn()
        results[name] = value
    except Exception as e:
        value = None
        results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        log(f"{name} FAILED: {type(e).__name__}: {e}")
    results.setdefault("stage_seconds", {})[name] = round(time.perf_counter() - t0, 2)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    return value


# -- environment -------------------------------------------------------------------------------------


def prepare_onnxruntime(device: str) -> dict[str, Any]:
    import onnxruntime as ort

    if device != "cpu" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # the CUDA and cuDNN of the installed nvidia-* wheels, before any session
    return {"onnxruntime": ort.__version__, "file": ort.__file__, "providers": ort.get_available_providers()}


def environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["nvidia_smi"] = str(e)
    try:
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    except Exception as e:  # expected on this machine: recorded, not fatal
        info["tensorrt"] = f"not importable ({type(e).__name__}: {e})"
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def copy_bandwidth(device: str) -> dict[str, Any]:
    """Device-to-device copy bandwidth (bytes read + written per second): the roofline's denominator."""
    import torch

    if device != "cuda":
        return {"bytes_per_s": None, "note": "measured on the GPU only"}
    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    bw = 2 * n * reps / (time.perf_counter() - t0)
    del a, b
    torch.cuda.empty_cache()
    return {"bytes_per_s": bw, "tb_per_s": round(bw / 1e12, 3), "method": "torch copy_ of 2 GiB, 20 reps"}


# -- checkpoints and bundles --------------------------------------------------------------------------


def rsedge_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rsedge.cli", *args], capture_output=True, text=True, timeout=timeout, env=os.environ
    )


def make_full_checkpoint(work: Path) -> Path:
    ckpt = work / "full-ckpt"
    if not (ckpt / "config.json").is_file():
        r = rsedge_cli("make-checkpoint", str(ckpt), "--size", "full", "--seed", "0")
        if r.returncode:
            raise RuntimeError(f"make-checkpoint failed: {r.stderr[-2000:]}")
    return ckpt


def export_all(checkpoint: Path, work: Path, validate: bool, recipes: dict[str, list[str]]) -> dict[str, Any]:
    """Export every recipe in parallel processes; {name: {path, seconds, bytes} or {error}}."""

    def one(name: str) -> tuple[str, dict[str, Any]]:
        out = work / name
        if (out / "manifest.json").is_file():
            return name, {"path": str(out), "seconds": 0.0, "reused": True, "bytes": _bundle_bytes(out)}
        args = ["export", str(checkpoint), "-o", str(out), *recipes[name]]
        if not validate:
            args.append("--no-validate")
        t0 = time.perf_counter()
        r = rsedge_cli(*args)
        took = round(time.perf_counter() - t0, 1)
        if r.returncode:
            return name, {"error": (r.stderr or r.stdout)[-2000:], "seconds": took}
        return name, {"path": str(out), "seconds": took, "bytes": _bundle_bytes(out), "log": r.stdout[-1500:]}

    with ThreadPoolExecutor(len(recipes)) as pool:
        return dict(pool.map(one, recipes))


def _bundle_bytes(bundle: Path) -> dict[str, int]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {rel: meta["bytes"] for rel, meta in manifest["files"].items()}


# -- parity on the device -------------------------------------------------------------------------------


def load_reference(checkpoint: Path, device: str, dtype: str = "float32") -> Any:
    import torch

    from rsedge.models.rsunivlm.modeling import RSUniVLMForCausalLM

    model = RSUniVLMForCausalLM.from_checkpoint(checkpoint, dtype=getattr(torch, dtype))
    return model.to(device)


def reference_logits(
    model: Any, pipe: Any, paths: list[Path], prompt: str, expert: int, tokens: list[int]
) -> np.ndarray:
    """The reference's last-position logits at the prefill and after each of ``tokens[:-1]``, teacher-forced."""
    import torch

    from rsedge.runtime.images import load_image
    from rsedge.runtime.prompt import build_prompt, tokenize

    weight = model.lm.model.embed_tokens.weight
    images = [load_image(p) for p in paths]
    ids = tokenize(pipe.tokenizer, build_prompt(prompt, len(images)))
    visual = [
        model.image_tokens(torch.from_numpy(pipe.pixel_values(im)).to(weight.device, weight.dtype), im.size)
        for im in images
    ]
    out = model.step(model.embed_prompt(ids, visual), expert)
    rows = [out.logits[0, -1].float().cpu().numpy()]
    for tok in tokens[:-1]:
        out = model.step(model.lm.model.embed_tokens(torch.tensor([[tok]], device=weight.device)), expert, out.cache)
        rows.append(out.logits[0, -1].float().cpu().numpy())
    return np.stack(rows)


def compare_logits(got: np.ndarray, ref: np.ndarray, tokens: list[int]) -> dict[str, Any]:
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    cos = np.sum(got * ref, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1) + 1e-30)
    agree = np.argmax(ref, axis=1) == np.asarray(tokens)
    first_diff = int(np.argmin(agree)) if not agree.all() else None
    return {
        "steps": len(tokens),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "max_abs_diff": float(np.max(np.abs(got - ref))),
        "ref_logit_absmax": float(np.max(np.abs(ref))),
        "greedy_agreement": float(agree.mean()),
        "identical_tokens": bool(agree.all()),
        "first_divergence": first_diff,
    }


def parity(
    bundle: Path, reference: Any, device: str, cases: list[tuple[tuple[str, ...], str]], new_tokens: int
) -> dict[str, Any]:
    from rsedge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, device=device, verify="size")
    rows = []
    for names, prompt in cases:
        paths = [SAMPLES / n for n in names]
        ans = pipe.generate(paths, prompt, max_new_tokens=new_tokens, keep_logits=True, ignore_eos=True)
        ref = reference_logits(reference, pipe, paths, prompt, ans.expert, ans.tokens)
        row = {"prompt": prompt, "expert": ans.expert, "prompt_tokens": ans.prompt_tokens}
        row.update(compare_logits(np.stack(ans.step_logits), ref, ans.tokens))
        rows.append(row)
    return {
        "device": device,
        "cases": rows,
        "identical_tokens": sum(r["identical_tokens"] for r in rows),
        "of": len(rows),
        "cosine_min": min(r["cosine_min"] for r in rows),
        "greedy_agreement": float(np.mean([r["greedy_agreement"] for r in rows])),
    }


def cross_device_tokens(bundle: Path, device: str, new_tokens: int) -> dict[str, Any]:
    """The same bundle on the CPU and on ``device``: identical greedy answers for every case?"""
    from rsedge.runtime.pipeline import Pipeline

    cpu, dev = Pipeline.load(bundle, verify="size"), Pipeline.load(bundle, device=device, verify="size")
    same = []
    for names, prompt in CASES:
        paths = [SAMPLES / n for n in names]
        a = cpu.generate(paths, prompt, max_new_tokens=new_tokens, ignore_eos=True).tokens
        b = dev.generate(paths, prompt, max_new_tokens=new_tokens, ignore_eos=True).tokens
        same.append(a == b)
    return {"identical": sum(same), "of": len(same)}


def tensorrt_probe(bundle: Path) -> dict[str, Any]:
    """Whether onnxruntime's TensorRT provider runs here (it needs TensorRT's libraries, absent on this machine)."""
    from rsedge.runtime.pipeline import Pipeline

    try:
        ans = Pipeline.load(bundle, device="tensorrt", verify="size").generate(
            [SAMPLES / BENCH_CASE[0][0]], BENCH_CASE[1], max_new_tokens=4, ignore_eos=True
        )
        return {"ran": True, "tokens": ans.tokens}
    except Exception as e:  # recorded: the reason is the finding
        return {"ran": False, "reason": f"{type(e).__name__}: {str(e)[:600]}"}


# -- speed and memory ----------------------------------------------------------------------------------------


def bench_in_fresh_process(bundle: Path, device: str, new_tokens: int, warmup: bool = False) -> dict[str, Any]:
    """``rsedge bench`` in a child process that imports no torch: its memory is the runtime's alone."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        args = ["bench", str(bundle), "--device", device, "--new-tokens", str(new_tokens), "--verify", "size"]
        r = rsedge_cli(*args, *(["--warmup"] if warmup else []), "--json", str(out), timeout=600)
        if r.returncode:
            raise RuntimeError(f"rsedge bench failed: {(r.stderr or r.stdout)[-2500:]}")
        return json.loads(out.read_text())


def bench_reference(checkpoint: Path, device: str, new_tokens: int, dtype: str = "float16") -> dict[str, Any]:
    """The PyTorch reference on the same device and prompt: vision, prefill, decode, and HF ``generate``."""
    import torch

    from rsedge.runtime.images import load_image
    from rsedge.runtime.preprocess import preprocess_square
    from rsedge.runtime.prompt import build_prompt, tokenize

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dt = getattr(torch, dtype) if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = load_reference(checkpoint, device, "float32").to(dt)
    load_s = time.perf_counter() - t0
    # PyTorch at its best on a GPU uses SDPA kernels, not the eager attention the parity reference keeps.
    attn = "eager"
    if device == "cuda" and hasattr(model.lm, "set_attn_implementation"):
        try:
            model.lm.set_attn_implementation("sdpa")
            attn = "sdpa"
        except (ValueError, ImportError) as e:
            attn = f"eager (sdpa refused: {e})"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    names, prompt = BENCH_CASE
    image = load_image(SAMPLES / names[0])
    pixels = torch.from_numpy(preprocess_square(image, model.cfg.vision.image_size)).to(device, dt)
    ids = tokenize(tok, build_prompt(prompt, 1))
    expert = 1  # [VG]

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
        times, out = [], None
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            out = fn()
            sync()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times), out

    def request() -> list[int]:
        embeds = model.embed_prompt(ids, [model.image_tokens(pixels, image.size)])
        out = model.step(embeds, expert)
        toks = []
        for _ in range(new_tokens):
            t = int(torch.argmax(out.logits[0, -1]))
            toks.append(t)
            out = model.step(model.lm.model.embed_tokens(torch.tensor([[t]], device=device)), expert, out.cache)
        return toks

    with torch.no_grad():
        first_ms, _ = timed(request, 1)
        warm_ms, _ = timed(request, 3)
        vision_ms, visual = timed(lambda: model.image_tokens(pixels, image.size), 10)
        embeds = model.embed_prompt(ids, [visual])
        prefill_ms, out = timed(lambda: model.step(embeds, expert), 5)
        steps = []
        for _ in range(new_tokens):
            t = int(torch.argmax(out.logits[0, -1]))
            row = model.lm.model.embed_tokens(torch.tensor([[t]], device=device))
            ms, out = timed(lambda row=row, out=out: model.step(row, expert, out.cache), 1)
            steps.append(ms)
        for layer in model.lm.model.layers:
            layer.mlp.active = expert
        gen_ms, _ = timed(
            lambda: model.lm.generate(
                inputs_embeds=embeds, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            ),
            3,
        )
    return {
        "dtype": str(dt),
        "device": device,
        "attention": attn,
        "prompt_tokens": int(embeds.shape[1]),
        "load_s": round(load_s, 2),
        "first_request_s": round(first_ms / 1e3, 3),
        "warm_request_s": round(warm_ms / 1e3, 3),
        "vision_ms": round(vision_ms, 3),
        "prefill_ms": round(prefill_ms, 3),
        "decode_ms_median": round(statistics.median(steps), 3),
        "decode_tok_per_s": round(1e3 / statistics.median(steps), 1),
        "hf_generate_s": round(gen_ms / 1e3, 3),
        "hf_generate_ms_per_token": round(gen_ms / new_tokens, 3),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 1e6, 1) if device == "cuda" else None,
    }


def roofline(bundle: Path, depth: int, bandwidth: float | None, gpu: str | None) -> dict[str, Any]:
    """Bytes one decode step must read (one expert's weights, the KV cache at ``depth``, one embedding row)
    over the measured copy bandwidth and the datasheet's."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = manifest["files"]
    experts = manifest["graphs"]["decoder"]["experts"]
    text = manifest["model"]["text"]
    table = 0  # the embedding table lives in decoder_shared.bin but a step reads one row of it
    for key in ("embed_tokens", "embed_scales"):
        if key in manifest["arrays"]:
            a = manifest["arrays"][key]
            table += int(np.prod(a["shape"])) * np.dtype(a["dtype"]).itemsize
    tied = text.get("tie_word_embeddings", False)  # a tied head reads the whole table every step
    shared = files.get("decoder_shared.bin", {}).get("bytes", 0) - (0 if tied else table)
    bins = [Path(e["file"]).with_suffix(".bin").name for e in experts.values()]
    expert_bytes = max(files.get(name, {}).get("bytes", 0) for name in bins)
    hd = text["hidden_size"] // text["num_attention_heads"]
    kv_item = 4 if manifest.get("compute_dtype", manifest["precision"]) in ("fp32", "float32") else 2
    kv = text["num_hidden_layers"] * 2 * text["num_key_value_heads"] * depth * hd * kv_item
    total = shared + expert_bytes + kv
    out: dict[str, Any] = {"bytes_per_token": total, "weights_bytes": shared + expert_bytes, "kv_bytes": kv}
    if bandwidth:
        out["roofline_ms_measured_bw"] = round(total / bandwidth * 1e3, 4)
    spec = next((v for k, v in DATASHEET_BANDWIDTH.items() if gpu and k in gpu), None)
    if spec:
        out["roofline_ms_datasheet_bw"] = round(total / spec * 1e3, 4)
    return out


# -- the run -------------------------------------------------------------------------------------------------


def run(out: Path, device: str, new_tokens: int, skip_full: bool, demo: Path, full: Path | None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("RSEDGE_GPU_WORK", out / "work"))  # bundles stay here, never under OUT
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device}
    stage(results, out, "onnxruntime", lambda: prepare_onnxruntime(device))
    env = stage(results, out, "environment", lambda: environment(device)) or {}
    bw = stage(results, out, "bandwidth", lambda: copy_bandwidth(device)) or {}
    # The full-size checkpoint is made while the demo model's bundles export and run.
    full_job = None if skip_full else ThreadPoolExecutor(1).submit(lambda: full or make_full_checkpoint(work))
    run_demo(results, out, work, device, demo)
    if full_job is not None:
        ckpt = stage(results, out, "full_checkpoint", full_job.result)
        if ckpt is not None:
            run_full(results, out, work, device, ckpt, new_tokens, bw.get("bytes_per_s"), env.get("gpu"))
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def run_demo(results: dict[str, Any], out: Path, work: Path, device: str, demo: Path) -> None:
    """The small checkpoint: export validated bundles, parity on the device for every task, CPU vs device."""
    bundles = stage(results, out, "demo_export", lambda: export_all(demo, work / "demo", True, RECIPES)) or {}
    paths = {name: Path(info["path"]) for name, info in bundles.items() if "path" in info}
    ref = stage(results, out, "demo_reference", lambda: load_reference(demo, device))
    if ref is not None:
        for name, path in paths.items():
            stage(results, out, f"demo_parity_{name}", lambda path=path: parity(path, ref, device, CASES, 24))
    if device != "cpu" and "int4" in paths:
        stage(results, out, "demo_int4_cpu_vs_device", lambda: cross_device_tokens(paths["int4"], device, 24))
    if device == "cuda" and "fp16" in paths:
        stage(results, out, "tensorrt_provider_probe", lambda: tensorrt_probe(paths["fp16"]))


def run_full(
    results: dict[str, Any],
    out: Path,
    work: Path,
    device: str,
    ckpt: Path,
    new_tokens: int,
    bandwidth: float | None,
    gpu: str | None,
) -> None:
    """The full-size checkpoint: export, parity of the bench request, speed and memory, PyTorch, roofline."""
    bundles = stage(results, out, "full_export", lambda: export_all(ckpt, work / "full", False, RECIPES)) or {}
    paths = {name: Path(info["path"]) for name, info in bundles.items() if "path" in info}
    ref = stage(results, out, "full_reference", lambda: load_reference(ckpt, device))
    if ref is not None:
        for name, path in paths.items():
            stage(results, out, f"full_parity_{name}", lambda path=path: parity(path, ref, device, [BENCH_CASE], 32))
    ref = None
    _free_torch(device)
    for name, path in paths.items():
        bench = stage(results, out, f"full_bench_{name}", lambda p=path: bench_in_fresh_process(p, device, new_tokens))
        if bench:
            depth = bench["prompt_tokens"]
            stage(results, out, f"full_roofline_{name}", lambda p=path, d=depth: roofline(p, d, bandwidth, gpu))
    if "int4" in paths:  # sessions created and run once at load: what a service's first request costs
        p4 = paths["int4"]
        stage(results, out, "full_bench_int4_warmup", lambda: bench_in_fresh_process(p4, device, new_tokens, True))
    stage(results, out, "full_reference_fp16", lambda: bench_reference(ckpt, device, new_tokens))


def _free_torch(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def table(results: dict[str, Any]) -> str:
    lines = ["| what | vision ms | prefill ms | decode ms/tok | tok/s | warm request s | first request s | GPU MB |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in RECIPES:
        b = results.get(f"full_bench_{name}") or {}
        if "decode_ms_median" in b:
            lines.append(
                f"| rsedge {name} | {b['vision_ms']} | {b['prefill_ms']} | {b['decode_ms_median']} | "
                f"{b['decode_tok_per_s']} | {b['warm_request_s']} | {b['first_request_s']} | "
                f"{b['gpu_memory_mb']} |"
            )
    r = results.get("full_reference_fp16") or {}
    if "decode_ms_median" in r:
        lines.append(
            f"| PyTorch {r['dtype']} | {r['vision_ms']} | {r['prefill_ms']} | {r['decode_ms_median']} | "
            f"{r['decode_tok_per_s']} | {r['warm_request_s']} | {r['first_request_s']} | {r['peak_memory_mb']} |"
        )
    lines.append("")
    lines.append("| parity | identical greedy tokens | agreement | min cosine |")
    lines.append("|---|---|---|---|")
    for key, p in results.items():
        if key.startswith(("demo_parity_", "full_parity_")) and isinstance(p, dict) and "of" in p:
            agree = f"{p['greedy_agreement']:.3f}"
            lines.append(f"| {key} | {p['identical_tokens']}/{p['of']} | {agree} | {p['cosine_min']:.5f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/gpu-check")))
    ap.add_argument("--device", choices=["cuda", "tensorrt", "cpu"], default="cuda")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-full", action="store_true", help="only the built-in model")
    ap.add_argument("--demo", type=Path, default=DEMO, help="the small checkpoint (default: built-in)")
    ap.add_argument("--full", type=Path, default=None, help="an existing full-size checkpoint")
    args = ap.parse_args(argv)
    results = run(args.out, args.device, args.new_tokens, args.skip_full, args.demo, args.full)
    print(table(results))
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    print(f"stages failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
