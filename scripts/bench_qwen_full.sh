#!/usr/bin/env bash
# Full-size Qwen2.5-VL-3B (random weights): make the checkpoint and two INT4 bundles with the INT8 vision graph:
#   int4        the onnxruntime CPU form (--vision int8: the INT4 recipe alone keeps the tower in the compute dtype),
#               timed by rsedge bench-decode against the PyTorch reference (transformers' language model, the same
#               random text prompt, same threads);
#   int4-jp6.1  the Jetson form (--target jp6.1: TensorRT's Q/DQ INT4, FP16 activations and KV, INT8 vision by that
#               target's default), which rsedge estimate reads for every Jetson target at CONTEXT tokens with one
#               IMAGE_SIZE image: does it fit an 8 GB Orin Nano with room for the context.
# sizes.json: each bundle's decoder against an FP16 decoder COMPUTED from the checkpoint's language-model parameter
# count x 2 bytes (an FP16 export of the full size is ~7 GB of disk and time, so none is made).
# A person runs this on a quiet machine (the reference and each export's validation hold the model in float32: ~15 GB at
# full size); it is not a test (tests run it tiny).
#
#   scripts/bench_qwen_full.sh [OUT]        (default OUT: out/qwen-full)
#   SIZE=tiny|full (full)   THREADS (4)   PROMPT_TOKENS (760)   STEPS (32)   CONTEXT (4096)   IMAGE_SIZE (1024x1024)
#   BLOCK_SIZE (128; TensorRT takes 64 or 128, the tiny model's 64-wide rows need 64)
#   TARGETS ("orin-nano-8gb orin-nano-super orin-nx-16gb agx-orin-64gb")   CALIBRATION (rs-default: the INT8 vision
#   graph's calibration set)   PYTHON (python3)
# Everything it measures lands in OUT/*.json; the checkpoint and bundles are reused when already there.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/qwen-full}
SIZE=${SIZE:-full}
THREADS=${THREADS:-4}
PROMPT_TOKENS=${PROMPT_TOKENS:-760}
STEPS=${STEPS:-32}
CONTEXT=${CONTEXT:-4096}
IMAGE_SIZE=${IMAGE_SIZE:-1024x1024}
BLOCK_SIZE=${BLOCK_SIZE:-128}
TARGETS=${TARGETS:-orin-nano-8gb orin-nano-super orin-nx-16gb agx-orin-64gb}
CALIBRATION=${CALIBRATION:-rs-default}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
rsedge() { "$PY" -m rsedge.cli "$@"; }
mkdir -p "$OUT"

[ -d "$OUT/ckpt" ] || rsedge make-checkpoint "$OUT/ckpt" --arch qwen2_5_vl --size "$SIZE"
[ -d "$OUT/int4" ] || rsedge export "$OUT/ckpt" -o "$OUT/int4" --precision int4 --vision int8 \
  --block-size "$BLOCK_SIZE" --calibration "$CALIBRATION"
[ -d "$OUT/int4-jp6.1" ] || rsedge export "$OUT/ckpt" -o "$OUT/int4-jp6.1" --precision int4 --target jp6.1 \
  --block-size "$BLOCK_SIZE" --calibration "$CALIBRATION"

# Sizes: each INT4 decoder from its manifest's file records (decoder_expert0 + decoder_shared: layers, norms, head, the
# INT8 embedding rows), the FP16 decoder computed from the checkpoint's safetensors headers (no weights read).
"$PY" - "$OUT" <<'EOF' | tee "$OUT/sizes.json"
import json, sys
from pathlib import Path

from safetensors import safe_open

from rsedge.models.qwen2_5_vl.config import Qwen25VLConfig
from rsedge.models.qwen2_5_vl.weights import released_name
from rsedge.models.safetensors_files import checkpoint_files

out = Path(sys.argv[1])
cfg = Qwen25VLConfig.from_checkpoint(out / "ckpt")
counts = {"language": 0, "vision": 0}
for path in checkpoint_files(out / "ckpt"):
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            released = released_name(name)
            if released == "lm_head.weight" and cfg.text.tie_word_embeddings:
                continue  # a tied head reads the embedding table: an FP16 decoder stores it once
            n = 1
            for d in f.get_slice(name).get_shape():
                n *= d
            counts["vision" if released.startswith("visual.") else "language"] += n
sizes = {}
for name in ("int4", "int4-jp6.1"):
    files = json.loads((out / name / "manifest.json").read_text())["files"]
    mb = lambda keep: round(sum(f["bytes"] for p, f in files.items() if keep(p)) / 1e6, 2)  # noqa: E731
    sizes[name] = {
        "decoder_mb": mb(lambda p: p.startswith("decoder_")),
        "vision_mb": mb(lambda p: p.startswith("vision")),
        "bundle_mb": mb(lambda p: True),
    }
fp16_mb = round(counts["language"] * 2 / 1e6, 2)
sizes.update({
    "fp16": {
        "decoder_mb": fp16_mb,
        "how": "computed, not exported: the checkpoint's language-model parameters (safetensors headers; a tied "
        "lm_head counted once, as the embedding table) x 2 bytes",
        "language_parameters": counts["language"],
        "vision_parameters": counts["vision"],
    },
    "int4_vs_fp16_decoder": round(sizes["int4"]["decoder_mb"] / fp16_mb, 4),
    "int4_jp61_vs_fp16_decoder": round(sizes["int4-jp6.1"]["decoder_mb"] / fp16_mb, 4),
})
print(json.dumps(sizes, indent=2))
EOF

rsedge bench-decode "$OUT/ckpt" "$OUT/int4" --prompt-tokens "$PROMPT_TOKENS" --steps "$STEPS" \
  --threads "$THREADS" --json "$OUT/decode_int4.json" > /dev/null
for target in $TARGETS; do
  rsedge estimate "$OUT/int4-jp6.1" --target "$target" --context "$CONTEXT" --image-size "$IMAGE_SIZE" \
    --json "$OUT/estimate_$target.json" > /dev/null
done

"$PY" - "$OUT" $TARGETS <<'EOF'
import json, sys
from pathlib import Path

out, targets = Path(sys.argv[1]), sys.argv[2:]
sizes = json.loads((out / "sizes.json").read_text())
dec = json.loads((out / "decode_int4.json").read_text())
print(f"decoder: INT4 {sizes['int4']['decoder_mb']:.1f} MB vs FP16 {sizes['fp16']['decoder_mb']:.1f} MB computed "
      f"({sizes['int4_vs_fp16_decoder']:.3f}); INT8 vision graph {sizes['int4']['vision_mb']:.1f} MB; "
      f"bundle {sizes['int4']['bundle_mb']:.1f} MB")
j = sizes["int4-jp6.1"]
print(f"decoder (jp6.1 form): INT4 {j['decoder_mb']:.1f} MB ({sizes['int4_jp61_vs_fp16_decoder']:.3f} of FP16); "
      f"INT8 vision graph {j['vision_mb']:.1f} MB; bundle {j['bundle_mb']:.1f} MB")
for r in dec["results"]:
    print(f"decode {r['engine']}: {r['decode_step_ms_median']:.2f} ms/step (p90 {r['decode_step_ms_p90']:.2f}), "
          f"{r['tokens_per_s']:.1f} tok/s; prefill {r['prefill_ms']:.0f} ms for {dec['prompt_tokens']} tokens")
print(f"decode speed-up INT4 runtime vs PyTorch reference: {dec['runtime_vs_reference_decode_speedup']:.2f}x "
      f"({dec['threads']} threads)")
for target in targets:
    e = json.loads((out / f"estimate_{target}.json").read_text())
    m, img = e["memory"], e["image"]
    print(f"estimate {target} (int4-jp6.1): {m['total']['value'] / 1e6:,.0f} MB of {m['usable']['value'] / 1e6:,.0f} MB usable "
          f"({'fits' if m['fits'] else 'DOES NOT FIT'}, headroom {m['headroom']['value'] / 1e6:,.0f} MB) at context "
          f"{e['context']['value']} tokens with one {img['size'][0]}x{img['size'][1]} image ({img['tokens']} visual "
          f"tokens); decode {e['speed']['decode']['tokens_per_s']['value']:.1f} tok/s")
EOF
