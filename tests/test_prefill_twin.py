"""INT8 prefill twins (`--prefill int8`, the cpu target's default for INT8/INT4): the prompt runs through
onnxruntime's INT8 GEMM, the answer through the MatMulNBits decoder, over one KV cache."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from rsedge.cli import main
from rsedge.errors import OptionError
from rsedge.export.prefill_graph import dequantize_nbits, int8_per_channel
from rsedge.quantize.blockwise import matmulnbits_tensors, quantize_blockwise
from rsedge.runtime.pipeline import Pipeline

IMAGE, PROMPT = "dior_05863.png", "[VG] Where is the windmill?"


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (8, False)])
def test_dequantize_matches_the_quantizer(bits, symmetric) -> None:
    w = np.random.default_rng(bits).standard_normal((96, 40)).astype(np.float32)  # [K, N], K not a block multiple
    bq = quantize_blockwise(w, bits, 32, symmetric)
    t = matmulnbits_tensors(bq)
    got = dequantize_nbits(t["B"], t["scales"], t.get("zero_points"), bits, 96)
    np.testing.assert_array_equal(got, bq.dequantize().T)
    codes, scale = int8_per_channel(got)
    assert codes.shape == (96, 40) and codes.dtype == np.int8
    assert np.max(np.abs(codes.T * scale[:, None] - got)) <= scale.max() / 2 + 1e-7


@pytest.fixture(scope="module")
def bundles(tiny_checkpoint, tmp_path_factory):
    from rsedge.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("prefill")
    plain = export_bundle(tiny_checkpoint, root / "int4", precision="int4", block_size=32)
    twin = export_bundle(tiny_checkpoint, root / "int4-twin", precision="int4", block_size=32, prefill="int8")
    checks = {c["graph"]: c for c in twin["validation"]["graphs"]}
    assert {f"decoder_prefill_expert{e}" for e in range(3)} <= set(checks)  # validated like every graph
    assert plain["files"]["decoder_expert0.bin"] == twin["files"]["decoder_expert0.bin"]  # the decoder unchanged
    return root / "int4", root / "int4-twin"


def test_prompt_runs_through_the_twin_and_tokens_through_the_decoder(bundles, samples) -> None:
    plain, twin = (Pipeline.load(b) for b in bundles)
    dec = twin.decoder(1)
    runs = {"prefill": 0, "decode": 0}
    for name, session in (("prefill", dec.prefill_session), ("decode", dec.session)):
        inner = session.run_with_iobinding
        session.run_with_iobinding = lambda io, *a, f=inner, n=name: runs.__setitem__(n, runs[n] + 1) or f(io, *a)
    a = plain.generate([samples / IMAGE], PROMPT, max_new_tokens=12, keep_logits=True, ignore_eos=True)
    b = twin.generate([samples / IMAGE], PROMPT, max_new_tokens=12, keep_logits=True, ignore_eos=True)
    assert runs == {"prefill": 1, "decode": 11}
    first = a.step_logits[0].astype(np.float64), b.step_logits[0].astype(np.float64)
    cosine = float(first[0] @ first[1] / np.linalg.norm(first[0]) / np.linalg.norm(first[1]))
    assert cosine > 0.999 and b.step_logits[0].argmax() == a.step_logits[0].argmax()


def test_only_cpu_bundles_of_the_ort_form_take_a_twin(tiny_checkpoint, tmp_path) -> None:
    from rsedge.export.bundle import export_bundle

    with pytest.raises(OptionError, match="prefill twin needs"):
        export_bundle(tiny_checkpoint, tmp_path / "x", precision="int4", compute="fp16", prefill="int8")
    with pytest.raises(OptionError, match="prefill twin needs"):
        export_bundle(tiny_checkpoint, tmp_path / "y", precision="fp32", prefill="int8")
    r = CliRunner().invoke(
        main, ["export", str(tiny_checkpoint), "-o", str(tmp_path / "z"), "--target", "cuda", "--prefill", "int8"]
    )
    assert r.exit_code == 2 and "runs on the CPU provider" in r.output and not (tmp_path / "z").exists()
