"""Shared fixtures: tiny checkpoints in the released layout, and bundles exported from them (once per run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rsedge.demo import SAMPLES


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory) -> Path:
    """Every test's per-user caches (verified hashes, TensorRT engines) under a temporary folder, never the real
    home's; set for the whole run, so subprocesses the tests start inherit it."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        yield cache


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from rsedge.models.rsunivlm.checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def anyres_checkpoint(tmp_path_factory) -> Path:
    from rsedge.models.rsunivlm.checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "anyres", size="tiny", seed=1, aspect="anyres_max_4")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    from rsedge.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "fp32"
    export_bundle(tiny_checkpoint, out, precision="fp32")
    return out


@pytest.fixture(scope="session")
def tiny_bundle_fp16(tiny_checkpoint, tmp_path_factory) -> Path:
    from rsedge.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "fp16"
    export_bundle(tiny_checkpoint, out, precision="fp16")
    return out


@pytest.fixture(scope="session")
def anyres_bundle(anyres_checkpoint, tmp_path_factory) -> Path:
    from rsedge.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "anyres"
    export_bundle(anyres_checkpoint, out, precision="fp32")
    return out


@pytest.fixture(scope="session")
def tiny_reference(tiny_checkpoint):
    from rsedge.models.rsunivlm.modeling import RSUniVLMForCausalLM

    return RSUniVLMForCausalLM.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


@pytest.fixture(scope="session", params=["gqa", "gqa-shared"])
def tiny_bundle_gqa(request, tiny_checkpoint, tmp_path_factory) -> Path:
    from rsedge.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle") / request.param
    export_bundle(tiny_checkpoint, out, precision="fp32", attention=request.param)
    return out


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory) -> Path:
    """The built-in demo model (trained on aerial scenes): unlike the random tiny model, it answers with real boxes
    and masks. Exported once per run: the scene, service and console tests share it."""
    from rsedge.demo import BUILTIN_MODEL
    from rsedge.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "demo"
    export_bundle(BUILTIN_MODEL, out, precision="fp32", validate=False)
    return out
