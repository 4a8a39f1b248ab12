"""AWQ calibrates each expert on the prompts the bundle's router sends it, not on the set's default routing."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from rsedge.calibration.calibset import rs_default
from rsedge.export.bundle import export_bundle
from rsedge.models.rsunivlm.config import DEFAULT_EXPERT, DEFAULT_ROUTER
from rsedge.quantize.activations import collect_stats
from rsedge.quantize.calibrate import calibration_inputs, calibration_routing

ALL_GROUNDING = {"[SEG]": 1, "[VG]": 1, "[REF]": 1}  # expert 2 gets no prompt; expert 1 gets 32 of 48
SWAPPED = {"[SEG]": 1, "[VG]": 2, "[REF]": 2}


def test_awq_export_follows_the_bundle_router(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("RSEDGE_CACHE", str(tmp_path / "cache"))
    kw = {"precision": "int4", "block_size": 32, "algorithm": "awq"}
    m = export_bundle(tiny_checkpoint, tmp_path / "a", router=ALL_GROUNDING, **kw)
    assert m["router"]["table"] == ALL_GROUNDING
    assert m["calibration"]["per_expert"] == {"0": 16, "1": 32, "2": 0}
    assert all(c["passed"] for c in m["validation"]["graphs"])
    experts = {int(name.split(".mlp.")[1].split(".")[0]) for name in m["awq"] if ".mlp." in name}
    assert experts == {0, 1}  # expert 2 runs no request of this bundle: nothing to calibrate it on, RTN
    # Cached statistics are per routing: the default router's export does not reuse this one's.
    default = export_bundle(tiny_checkpoint, tmp_path / "b", **kw)
    assert default["calibration"]["statistics_cached"] is False
    assert default["calibration"]["per_expert"] == {"0": 16, "1": 16, "2": 16}
    again = export_bundle(tiny_checkpoint, tmp_path / "c", router=ALL_GROUNDING, **kw)
    assert again["calibration"]["statistics_cached"] is True


def test_each_expert_sees_the_prompts_routed_to_it(tiny_checkpoint, tiny_reference):
    """Layer 0's MLP input does not depend on the expert, so under swapped routing expert 2's layer-0
    statistics are exactly what expert 1's were under the default routing (same prompts), and vice versa."""
    calib = rs_default()
    tok = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    default = calibration_routing(calib, DEFAULT_ROUTER, DEFAULT_EXPERT)
    swapped = calibration_routing(calib, SWAPPED, DEFAULT_EXPERT)
    assert default == [item.expert for item in calib.items]  # the set records the default router's choice
    assert swapped == [{1: 2, 2: 1}.get(e, e) for e in default]
    by_default = collect_stats(tiny_reference, calibration_inputs(tiny_reference, tok, calib, default))
    by_swapped = collect_stats(tiny_reference, calibration_inputs(tiny_reference, tok, calib, swapped))
    for a, b in ((1, 2), (2, 1), (0, 0)):
        got = by_swapped[f"model.layers.0.mlp.{a}.gate_up_proj.weight_t"]
        want = by_default[f"model.layers.0.mlp.{b}.gate_up_proj.weight_t"]
        assert got.tokens == want.tokens > 0
        np.testing.assert_allclose(got.abs_sum, want.abs_sum, rtol=1e-6)
    one = by_swapped["model.layers.0.mlp.1.gate_up_proj.weight_t"].tokens
    two = by_swapped["model.layers.0.mlp.2.gate_up_proj.weight_t"].tokens
    assert one != two  # run-length and box answers differ in length: the check can tell the experts apart
