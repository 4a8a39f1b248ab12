"""The optimized-graph cache: a static INT8 vision graph is optimized by onnxruntime once, later sessions load the
saved result; answers are token-identical with and without it; keys follow content, version and machine; a damaged
or unwritable cache is rebuilt or skipped, never fatal."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from rsedge.demo import SAMPLES
from rsedge.export.bundle import export_bundle
from rsedge.runtime import graph_cache
from rsedge.runtime.graph_cache import DATA, ENTRY, GRAPH, OptimizedGraphCache, entry_key
from rsedge.runtime.pipeline import Pipeline
from rsedge.runtime.sessions import SessionConfig

IMAGE, PROMPT = SAMPLES / "dior_05863.png", "[VG] Where is the storage tank?"


@pytest.fixture(scope="module")
def int8_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """INT8 weights with the statically quantized (Q/DQ) vision graph, the one the cache is for."""
    out = tmp_path_factory.mktemp("gc") / "int8"
    m = export_bundle(tiny_checkpoint, out, precision="int8", block_size=32, vision_calibration="minmax")
    assert m["graphs"]["vision"]["quantized"] == "int8-qdq"
    return out


BYTES = "<graph bytes>"


class SessionLog:
    """Every InferenceSession made: the graph it read and whether it optimized."""

    def __init__(self, monkeypatch) -> None:
        self.made: list[tuple[str, bool]] = []
        real = ort.InferenceSession

        def spy(path, sess_options=None, **kw):
            off = sess_options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            # a decoder on rsedge's attention kernel is made from its graph's bytes (rsedge.kernels)
            self.made.append((BYTES if isinstance(path, bytes) else str(path), not off))
            return real(path, sess_options=sess_options, **kw)

        monkeypatch.setattr(ort, "InferenceSession", spy)

    def vision(self) -> list[tuple[str, bool]]:
        return [(p, opt) for p, opt in self.made if "vision" in Path(p).name or Path(p).name == GRAPH]


def _answer(bundle: Path, cache: Path, use: bool = True, verify: str = "sha256") -> tuple[list[int], np.ndarray]:
    pipe = Pipeline.load(bundle, threads=1, verify=verify)
    pipe.session_cfg = SessionConfig(threads=1, graph_cache=cache, use_graph_cache=use)
    ans = pipe.generate([IMAGE], PROMPT, max_new_tokens=12, ignore_eos=True)
    return ans.tokens, pipe.run_vision(pipe.pixel_values(pipe.family.blank_image()))


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith(".")) if cache.exists() else []


def test_optimized_once_then_loaded_with_identical_answers(int8_bundle, tmp_path, monkeypatch):
    base_tokens, base_feats = _answer(int8_bundle, tmp_path / "unused", use=False)
    assert not (tmp_path / "unused").exists()
    log = SessionLog(monkeypatch)
    cache = tmp_path / "cache"
    tokens, feats = _answer(int8_bundle, cache)  # builds the entry
    (entry,) = _entries(cache)
    assert {p.name for p in entry.iterdir()} == {GRAPH, DATA, ENTRY}
    assert log.vision() == [(str(int8_bundle / "vision_int8.onnx"), True)]  # optimized from the bundle, once
    log.made.clear()
    again, feats2 = _answer(int8_bundle, cache)  # a new pipeline: the saved graph, optimizations off
    assert log.vision() == [(str(entry / GRAPH), False)]
    assert tokens == again == base_tokens
    np.testing.assert_array_equal(feats, base_feats)
    np.testing.assert_array_equal(feats2, base_feats)
    # decoders are not cached: their sessions are made from the bundle (or its graphs' bytes), optimized
    decoders = [(p, opt) for p, opt in log.made if "decoder" in Path(p).name or p == BYTES]
    assert decoders and all(opt and (p == BYTES or Path(p).parent == int8_bundle) for p, opt in decoders)


@pytest.mark.parametrize("damage", ["flip a weight byte", "truncate the graph", "garbage record", "extra file"])
def test_a_damaged_entry_is_rebuilt(damage, int8_bundle, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    tokens, _ = _answer(int8_bundle, cache)
    (entry,) = _entries(cache)
    if damage == "flip a weight byte":
        data = bytearray((entry / DATA).read_bytes())
        data[len(data) // 2] ^= 0x40
        (entry / DATA).write_bytes(bytes(data))
    elif damage == "truncate the graph":
        (entry / GRAPH).write_bytes((entry / GRAPH).read_bytes()[:100])
    elif damage == "garbage record":
        (entry / ENTRY).write_text("{not json")
    else:
        (entry / "stray.bin").write_bytes(b"x")
    log = SessionLog(monkeypatch)
    again, _ = _answer(int8_bundle, cache)
    assert again == tokens
    assert log.vision() == [(str(int8_bundle / "vision_int8.onnx"), True)]  # rebuilt from the bundle
    (entry2,) = _entries(cache)
    assert entry2 == entry and {p.name for p in entry.iterdir()} == {GRAPH, DATA, ENTRY}
    log.made.clear()
    _answer(int8_bundle, cache)
    assert log.vision() == [(str(entry / GRAPH), False)]  # and the rebuilt entry is used


def test_an_entry_onnxruntime_refuses_is_rebuilt(int8_bundle, tmp_path, monkeypatch):
    """Digests that match but a graph onnxruntime cannot load (another build wrote it): rebuilt, not fatal."""
    cache = tmp_path / "cache"
    tokens, _ = _answer(int8_bundle, cache)
    (entry,) = _entries(cache)
    bad = b"not a protobuf"
    (entry / GRAPH).write_bytes(bad)
    record = json.loads((entry / ENTRY).read_text())
    record["files"][GRAPH] = __import__("hashlib").sha256(bad).hexdigest()
    (entry / ENTRY).write_text(json.dumps(record))
    log = SessionLog(monkeypatch)
    assert _answer(int8_bundle, cache)[0] == tokens
    assert log.vision() == [(str(entry / GRAPH), False), (str(int8_bundle / "vision_int8.onnx"), True)]
    assert (entry / GRAPH).read_bytes() != bad


def test_an_unwritable_cache_still_answers(int8_bundle, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    tokens, _ = _answer(int8_bundle, blocker / "cache")
    assert tokens == _answer(int8_bundle, tmp_path / "unused", use=False)[0]
    assert blocker.read_text().startswith("a file")


def test_unhashed_bundles_and_float_graphs_do_not_use_it(int8_bundle, tiny_bundle, tmp_path):
    cache = tmp_path / "cache"
    _answer(int8_bundle, cache, verify="size")  # digests not checked: the manifest's say nothing of the files
    _answer(tiny_bundle, cache)  # an FP32 vision graph: not a static Q/DQ graph, so made as before
    assert _entries(cache) == []


def test_the_key_follows_content_version_providers_level_and_cpu(monkeypatch):
    base = ("a" * 64, "1.32.0", ["CPUExecutionProvider"], "ORT_ENABLE_ALL")
    k = entry_key(*base)
    assert k == entry_key(*base) and len(k) == 64
    for i, other in enumerate(("b" * 64, "1.33.0", ["CUDAExecutionProvider"], "ORT_ENABLE_EXTENDED")):
        changed = list(base)
        changed[i] = other
        assert entry_key(*changed) != k
    monkeypatch.setattr(graph_cache, "cpu_identity", lambda: "x86_64|another CPU|avx2")
    assert entry_key(*base) != k


def test_concurrent_pipelines_make_one_entry(int8_bundle, tmp_path):
    """Four pipelines creating the vision session at once: each gets a working session, one entry results."""
    cache = tmp_path / "cache"
    pipes = [Pipeline.load(int8_bundle, threads=1) for _ in range(4)]
    for p in pipes:
        p.session_cfg = SessionConfig(threads=1, graph_cache=cache)
    pixels = pipes[0].pixel_values(pipes[0].family.blank_image())
    start, out, errors = threading.Barrier(4), [None] * 4, []

    def go(i: int) -> None:
        try:
            start.wait()
            out[i] = pipes[i].run_vision(pixels)
        except Exception as e:  # recorded, asserted below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(np.array_equal(o, out[0]) for o in out)
    (entry,) = _entries(cache)
    assert {p.name for p in entry.iterdir()} == {GRAPH, DATA, ENTRY}
    assert OptimizedGraphCache(cache)._intact(entry)


def test_one_pipeline_creates_its_vision_session_once(int8_bundle, tmp_path, monkeypatch):
    pipe = Pipeline.load(int8_bundle, threads=1)
    pipe.session_cfg = SessionConfig(threads=1, graph_cache=tmp_path / "cache")
    log = SessionLog(monkeypatch)
    start = threading.Barrier(4)

    def go() -> None:
        start.wait()
        pipe.vision()

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(log.vision()) == 1
