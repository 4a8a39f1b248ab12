"""One linear-name map per architecture, read by quantization and by validation alike.

For RSUniVLM (Qwen2 with three experts) and UniRS (a dense LLaMA): the exporter's map names exactly the weights
the quantized decoder graph carries; AWQ's statistics come back under exactly those names; and the map an export's
validation splits the dequantized weights by is the exporter's, the same object quantization read.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rsedge.models.rsunivlm.exporter as rsunivlm_exporter
import rsedge.models.unirs.exporter as unirs_exporter
from rsedge.export.driver import ExportOptions, run_export
from rsedge.export.linear_map import LINEAR_MAP
from rsedge.models.registry import architecture_for
from rsedge.models.unirs import make_checkpoint as make_unirs
from rsedge.quantize.activations import collect_stats

MODULES = {"rsunivlm": rsunivlm_exporter, "unirs": unirs_exporter}


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    return {"rsunivlm": tiny_checkpoint, "unirs": make_unirs(tmp_path_factory.mktemp("lm") / "u", size="tiny", seed=5)}


def _exporter(checkpoint: Path, **options):
    exporter = architecture_for(checkpoint).load().EXPORTER(checkpoint, ExportOptions(**options).resolve())
    exporter.check()
    return exporter


@pytest.mark.parametrize("arch", ["rsunivlm", "unirs"])
def test_quantization_and_validation_read_the_exporters_map(arch, checkpoints, tmp_path, monkeypatch):
    seen: dict[str, object] = {}
    real = MODULES[arch].apply_fake_quant

    def spy(model, cache):  # what validation was handed, and the reference it then compared with
        seen["map"], seen["cache"], seen["model"] = cache[LINEAR_MAP], dict(cache), model
        real(model, cache)

    monkeypatch.setattr(MODULES[arch], "apply_fake_quant", spy)
    exporter = _exporter(checkpoints[arch], precision="int4", block_size=32, attention="standard")
    lmap = exporter.linear_map()
    run_export(exporter, tmp_path / "b", lambda m: None)

    # Validation split the weights by the exporter's map: equal to a fresh one, entry for entry.
    assert seen["map"] == lmap and len(lmap) > 0
    quantized = {key[1] for key in seen["cache"] if key[0] == "blockwise"}
    assert quantized == set(lmap.by_graph), "every quantized graph weight has a map entry, and no entry is spare"
    modules = dict(seen["model"].named_modules())
    for entry in lmap:
        assert all(isinstance(modules[m], torch.nn.Linear) for m in entry.modules), entry

    # Quantization hooks the same map: statistics under exactly its graph names (every expert visited).
    model = _reference(checkpoints[arch])
    hidden = model.cfg.text.hidden_size
    experts = range(model.cfg.text.num_experts)
    batches = [(torch.randn(1, 5, hidden, generator=torch.Generator().manual_seed(e)), e) for e in experts]
    step = (lambda x, _e: model.step(x)) if arch == "unirs" else None
    stats = collect_stats(model, batches, linear_map=lmap, step=step)
    assert set(stats) == set(lmap.by_graph)
    assert all(s.tokens == 5 * (len(experts) if "mlp" not in name else 1) for name, s in stats.items())


def _reference(checkpoint: Path) -> torch.nn.Module:
    exporter = _exporter(checkpoint)
    exporter.load(lambda m: None)
    return exporter.reference()
