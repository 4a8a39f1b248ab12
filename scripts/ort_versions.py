"""Which onnxruntime runs which bundle form: a tool a person runs when onnxruntime or the exporter changes.

    python scripts/ort_versions.py [--versions 1.18.1,1.20.1,1.23.2] [--forms int8-ort,int4-ort] [--json out.json]

1. exports the built-in model (or ``--model``) once per graph form with this interpreter (it needs torch),
2. answers the same requests with this interpreter's onnxruntime: the reference,
3. for each version makes a throwaway venv (onnxruntime==V numpy tokenizers Pillow click; ``--venvs``, reused
   between runs) and answers them again there, with rsedge's own version check switched off, so what is seen is
   what that onnxruntime does,
4. prints the matrix (runs with the same tokens / runs with other tokens / fails how) and, per cell, whether the
   bundle's manifest (``runtime.onnxruntime_min``) would have refused that version: "refused" where it fails is
   the table in rsedge/runtime/ort_support.py being right, "runs" where it was refused is that table being too
   strict, and a failure it would have let through is a missing rule.

Python 3.11 has onnxruntime wheels from 1.15; numpy 2 needs onnxruntime >= 1.19 (older ones get numpy<2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the last patch of each release, and the first of the releases where a feature arrives
DEFAULT_VERSIONS = (
    "1.15.0", "1.15.1", "1.16.3", "1.17.3", "1.18.0", "1.18.1", "1.19.0", "1.19.2", "1.20.0",
    "1.20.1", "1.21.0", "1.21.1", "1.22.0", "1.22.1", "1.23.0", "1.23.1", "1.23.2",
)  # fmt: skip
# Logits further than this from the reference's are wrong answers, not rounding: FP16 and INT8 forms differ
# from release to release by up to ~0.3 (which can flip a near-tie token), a broken kernel by 9 or more.
WRONG_LOGITS = 1.0

# name -> export_bundle options. The defaults of each precision first, then forms that isolate one feature.
FORMS: dict[str, dict] = {
    "fp32": {"precision": "fp32"},
    "fp16": {"precision": "fp16"},
    "fp32-gqa": {"precision": "fp32", "attention": "gqa"},
    "fp32-gqa-shared": {"precision": "fp32", "attention": "gqa-shared"},
    "fp16-gqa": {"precision": "fp16", "attention": "gqa"},
    "int8-ort": {"precision": "int8"},  # MatMulNBits bits 8, gqa-shared, static INT8 vision
    "int8-ort-standard": {"precision": "int8", "attention": "standard", "vision": "model"},
    "int4-ort": {"precision": "int4"},  # MatMulNBits bits 4, gqa-shared, vision in fp32
    "int4-ort-standard": {"precision": "int4", "attention": "standard"},
    "int4-ort-prefill-int8": {"precision": "int4", "prefill": "int8"},  # --target cpu: DynamicQuantizeMatMul twin
    "int4-ort-fp16-gqa": {"precision": "int4", "compute": "fp16", "attention": "gqa"},  # --target cuda
    "fp32-scatter-shared": {"precision": "fp32", "attention": "scatter-shared"},  # RotaryEmbedding, ScatterElements
    "fp16-scatter-shared": {"precision": "fp16", "attention": "scatter-shared"},
    "int8-qdq": {"precision": "int8", "form": "qdq"},  # per-channel DequantizeLinear, fp16
    "int4-qdq": {"precision": "int4", "form": "qdq"},  # blocked INT4 DequantizeLinear, opset 21, fp16
}

REQUESTS = (
    (("dior_05863.png",), "[VG] Where is the building?"),
    (("aid_storagetanks_207.jpg",), "[CAP] Describe this image briefly."),
    (("levircd_test_2_0000_0000_A.png", "levircd_test_2_0000_0000_B.png"), "[SEG] Please segment the changes."),
)
MAX_NEW_TOKENS = 8


# -- in the venv under test: answer the requests, print JSON --------------------------------------------


def answer(bundle: Path, logits_out: Path, out: dict) -> None:
    """Run REQUESTS on ``bundle`` with whatever onnxruntime this interpreter has (no torch needed) into ``out``."""
    import numpy as np
    import onnxruntime

    from rsedge.demo import SAMPLES
    from rsedge.runtime import ort_support
    from rsedge.runtime.bundle import Bundle
    from rsedge.runtime.pipeline import Pipeline

    out["onnxruntime"] = onnxruntime.__version__
    opened = Bundle.open(bundle, verify="size")
    out["rsedge_refuses"] = ort_support.refusal(opened.manifest, onnxruntime.__version__)
    ort_support.check_onnxruntime = lambda *a, **k: None  # measure what onnxruntime does, not what rsedge says
    pipe = Pipeline(opened)
    tokens, logits = [], []
    for images, prompt in REQUESTS:
        ans = pipe.generate(
            [SAMPLES / i for i in images], prompt, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True, keep_logits=True
        )
        tokens.append(ans.tokens)
        logits.append(np.stack(ans.step_logits).astype(np.float32))
    np.savez(logits_out, *logits)
    out["tokens"] = tokens


def answer_main(bundle: str, logits_out: str) -> None:
    res: dict = {}
    try:
        answer(Path(bundle), Path(logits_out), res)
    except Exception as e:  # what this onnxruntime says, as one line
        first = (str(e).strip().splitlines() or [""])[0]
        res["error"] = f"{type(e).__name__}: {first}"[:400]
    print("RESULT " + json.dumps(res))


# -- the driver ----------------------------------------------------------------------------------------------


def export_forms(model: Path, out: Path, forms: list[str]) -> None:
    from rsedge.export.bundle import export_bundle

    for name in forms:
        target = out / name
        if (target / "manifest.json").is_file():
            continue
        t = time.perf_counter()
        export_bundle(model, target, **FORMS[name])
        print(f"exported {name} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)


def make_venv(root: Path, version: str) -> Path:
    py = root / version / "bin" / "python"
    if py.is_file():
        return py
    subprocess.run([sys.executable, "-m", "venv", str(root / version)], check=True)
    major_minor = tuple(int(p) for p in version.split(".")[:2])
    numpy = "numpy" if major_minor >= (1, 19) else "numpy<2"  # older wheels are built against numpy 1
    pkgs = [f"onnxruntime=={version}", numpy, "tokenizers>=0.21.1", "Pillow", "click"]
    subprocess.run([str(py), "-m", "pip", "install", "-q", *pkgs], check=True)
    return py


def run_one(python: Path, bundle: Path, logits: Path) -> dict:
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); "
        "from scripts.ort_versions import answer_main; answer_main(*sys.argv[1:])"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [str(python), "-c", code, str(bundle), str(logits)], capture_output=True, text=True, timeout=600, env=env
    )
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (res.stderr.strip().splitlines() or [""])[-1]
    return {"error": f"exit {res.returncode} ({tail[:300]})"}


def verdict(ref: dict, got: dict, ref_logits: Path, got_logits: Path) -> tuple[str, str]:
    """("runs" | "wrong" | "fails", what a person reads)."""
    import numpy as np

    if "error" in got:
        return "fails", "fails: " + got["error"]
    a, b = np.load(ref_logits), np.load(got_logits)
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a.files)
    same = got["tokens"] == ref["tokens"]
    text = f"{'same tokens' if same else 'other tokens'}, max|dlogit| {diff:.1e}"
    return ("wrong", "WRONG: " + text) if diff > WRONG_LOGITS else ("runs", "runs, " + text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--versions", default=",".join(DEFAULT_VERSIONS))
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: the built-in model)")
    ap.add_argument(
        "--bundles",
        type=Path,
        default=Path(tempfile.gettempdir()) / "rsedge-ort-bundles",
        help="exported once and reused: remove it after changing the exporter",
    )
    ap.add_argument("--venvs", type=Path, default=Path(tempfile.gettempdir()) / "rsedge-ort-venvs")
    ap.add_argument("--json", type=Path, default=None, help="also write the matrix here")
    args = ap.parse_args()
    forms = [f for f in args.forms.split(",") if f]
    unknown = sorted(set(forms) - set(FORMS))
    if unknown:
        ap.error(f"unknown forms {unknown}; known: {', '.join(FORMS)}")
    versions = [v for v in args.versions.split(",") if v]

    from rsedge.demo import BUILTIN_MODEL

    export_forms(args.model or BUILTIN_MODEL, args.bundles, forms)
    args.venvs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rsedge-ort-logits-"))
    refs = {f: run_one(Path(sys.executable), args.bundles / f, work / f"ref-{f}.npz") for f in forms}
    for f, r in refs.items():
        if "error" in r:
            sys.exit(f"{f}: the reference onnxruntime fails: {r['error']}")
    matrix: dict[str, dict[str, dict]] = {}
    for v in versions:
        py = make_venv(args.venvs, v)
        for f in forms:
            got = run_one(py, args.bundles / f, work / f"{v}-{f}.npz")
            status, text = verdict(refs[f], got, work / f"ref-{f}.npz", work / f"{v}-{f}.npz")
            cell = {"status": status, "result": text, "rsedge_refuses": got.get("rsedge_refuses")}
            matrix.setdefault(v, {})[f] = cell
            flag = "refused" if cell["rsedge_refuses"] else "allowed"
            print(f"{v:>8}  {f:<20} {flag:<8} {cell['result']}", flush=True)
    mins = {f: json.loads((args.bundles / f / "manifest.json").read_text()).get("runtime") for f in forms}
    if args.json:
        args.json.write_text(json.dumps({"reference": refs, "matrix": matrix, "manifest_runtime": mins}, indent=2))
    mismatches = [
        (v, f)
        for v, row in matrix.items()
        for f, cell in row.items()
        if (cell["status"] != "runs") != bool(cell["rsedge_refuses"])
    ]
    for v, f in mismatches:
        print(f"MISMATCH {v} {f}: rsedge {'refuses' if matrix[v][f]['rsedge_refuses'] else 'allows'}, "
              f"onnxruntime {matrix[v][f]['result']}")
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
