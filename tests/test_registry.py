"""Every registered architecture has a tiny checkpoint that loads strictly and exports (none is untested)."""

from __future__ import annotations

import json

import pytest

from rsedge.errors import CheckpointError
from rsedge.models.registry import ARCHITECTURES, architecture_for, by_name

# An architecture whose exporter is not built yet, with the issue that builds it. Strict: once its export
# works, this test fails until the entry is removed, so no architecture stays untested by accident.
EXPORT_PENDING: dict[str, str] = {}


@pytest.mark.parametrize(
    "arch",
    [
        pytest.param(a, marks=pytest.mark.xfail(reason=EXPORT_PENDING[a.name], strict=True))
        if a.name in EXPORT_PENDING
        else a
        for a in ARCHITECTURES
    ],
    ids=lambda a: a.name,
)
def test_every_architecture_has_a_working_tiny_checkpoint(arch, tmp_path):
    module = arch.load()
    ckpt = module.make_checkpoint(tmp_path / "ckpt", size="tiny", seed=3)
    assert architecture_for(ckpt) == arch
    model = module.REFERENCE.from_checkpoint(ckpt)
    assert isinstance(model.cfg, module.CONFIG)
    manifest = module.export(ckpt, tmp_path / "bundle")
    assert all(c["passed"] for c in manifest["validation"]["graphs"])


def test_unknown_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_mistral"}))
    with pytest.raises(CheckpointError, match="'llava_mistral' is not supported"):
        architecture_for(tmp_path)
    with pytest.raises(CheckpointError, match="unknown architecture"):
        by_name("rsground_r1")
