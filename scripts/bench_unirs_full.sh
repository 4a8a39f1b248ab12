#!/usr/bin/env bash
# Full-size UniRS (VILA-1.5-3B dimensions, random weights): make the checkpoint, export INT4 (--target cpu) and
# FP16, print the decoder sizes INT4 vs FP16, then decode speed against the PyTorch reference (rsedge bench-decode:
# the same random prompt ids through both, same threads) and one whole request of the INT4 bundle (rsedge bench,
# the bundle's own vicuna_v1 prompt). A person runs this on a quiet machine; it is not a test (tests run it tiny).
#
#   scripts/bench_unirs_full.sh [OUT]        (default OUT: out/unirs-full)
#   SIZE=tiny|full (full)   THREADS (4)   PROMPT_TOKENS (760)   STEPS (32)   NEW_TOKENS (64)
#   CALIBRATION (rs-default: rs-default-unirs, the INT8 vision graph's calibration)   PYTHON (python3)
# Everything it measures lands in OUT/*.json; the checkpoint and bundles are reused when already there.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/unirs-full}
SIZE=${SIZE:-full}
THREADS=${THREADS:-4}
PROMPT_TOKENS=${PROMPT_TOKENS:-760}
STEPS=${STEPS:-32}
NEW_TOKENS=${NEW_TOKENS:-64}
CALIBRATION=${CALIBRATION:-rs-default}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
rsedge() { "$PY" -m rsedge.cli "$@"; }
mkdir -p "$OUT"

[ -d "$OUT/ckpt" ] || rsedge make-checkpoint "$OUT/ckpt" --arch unirs --size "$SIZE"
[ -d "$OUT/int4" ] || rsedge export "$OUT/ckpt" -o "$OUT/int4" --precision int4 --target cpu --calibration "$CALIBRATION"
[ -d "$OUT/fp16" ] || rsedge export "$OUT/ckpt" -o "$OUT/fp16" --precision fp16

# Decoder sizes from the manifests' file records: the decode graph's weights (decoder_expert0 + decoder_shared:
# layers, norms, lm_head, embedding table), the INT8 prefill twin apart.
"$PY" - "$OUT" <<'EOF' | tee "$OUT/sizes.json"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
sizes = {}
for name in ("int4", "fp16"):
    files = json.loads((out / name / "manifest.json").read_text())["files"]
    mb = lambda keep: round(sum(f["bytes"] for p, f in files.items() if keep(p)) / 1e6, 2)  # noqa: E731
    sizes[name] = {
        "decoder_mb": mb(lambda p: p.startswith("decoder_") and not p.startswith("decoder_prefill")),
        "prefill_twin_mb": mb(lambda p: p.startswith("decoder_prefill")),
        "bundle_mb": mb(lambda p: True),
    }
sizes["int4_vs_fp16_decoder"] = round(sizes["int4"]["decoder_mb"] / sizes["fp16"]["decoder_mb"], 4)
print(json.dumps(sizes, indent=2))
EOF

rsedge bench-decode "$OUT/ckpt" "$OUT/int4" --prompt-tokens "$PROMPT_TOKENS" --steps "$STEPS" \
  --threads "$THREADS" --json "$OUT/decode_int4.json" > /dev/null
rsedge bench "$OUT/int4" --image rsedge/data/samples/dota_P0075.png --prompt "Describe this image briefly." \
  --new-tokens "$NEW_TOKENS" --threads "$THREADS" --json "$OUT/request_int4.json" > /dev/null

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
sizes = json.loads((out / "sizes.json").read_text())
dec = json.loads((out / "decode_int4.json").read_text())
req = json.loads((out / "request_int4.json").read_text())
print(f"decoder: INT4 {sizes['int4']['decoder_mb']:.1f} MB vs FP16 {sizes['fp16']['decoder_mb']:.1f} MB "
      f"({sizes['int4_vs_fp16_decoder']:.3f}); INT4 prefill twin {sizes['int4']['prefill_twin_mb']:.1f} MB")
for r in dec["results"]:
    print(f"decode {r['engine']}: {r['decode_step_ms_median']:.2f} ms/step (p90 {r['decode_step_ms_p90']:.2f}), "
          f"{r['tokens_per_s']:.1f} tok/s; prefill {r['prefill_ms']:.0f} ms for {dec['prompt_tokens']} tokens")
print(f"decode speed-up INT4 runtime vs PyTorch reference: {dec['runtime_vs_reference_decode_speedup']:.2f}x "
      f"({dec['threads']} threads)")
print(f"request (INT4, {req['prompt_tokens']} prompt tokens): first {req['first_request_s']:.2f} s, "
      f"warm {req['warm_request_s']:.2f} s; machine: {req['machine'].get('cpu', req['machine'])}")
EOF
