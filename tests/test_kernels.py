"""rsedge's decode-attention kernel (rsedge/kernels/gqa_decode.c): the same numbers as onnxruntime's
GroupQueryAttention on every shape and option it takes, the same greedy answers through a bundle, and a fallback to
onnxruntime's kernel, with the reason, wherever it cannot be built."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from rsedge.bench.bench import attention_label
from rsedge.kernels import KernelUnavailable, build
from rsedge.kernels.attention_graph import DOMAIN, decode_graph
from rsedge.kernels.single_node import ORT_DOMAIN, Call, Shape, gqa_model, session
from rsedge.runtime.backends.base import DecoderSpec
from rsedge.runtime.backends.ort_cpu import OrtCpuDecoder
from rsedge.runtime.sessions import SessionConfig


@pytest.fixture(scope="module")
def library() -> Path:
    try:
        return build.library()
    except KernelUnavailable as e:  # CI fetches the header (scripts/test.sh); a bare machine may lack it
        pytest.skip(f"the kernel cannot be built here: {e}")


def gqa(domain: str, hd: int = 64, **kw) -> bytes:
    return gqa_model(domain, Shape(head_size=hd, max_positions=2048), **kw)


def attend(sess, seed: int, past: int, new: int, capacity: int, shared: bool, batch: int = 1, hd: int = 64):
    """One call of ``sess`` on random inputs: (output, present key, present value)."""
    return Call(sess, Shape(head_size=hd, max_positions=2048), seed, past, new, capacity, shared, batch).run()


CASES = [  # (past, new tokens, capacity, shared buffer, batch)
    (0, 1, 8, True, 1),
    (760, 1, 840, True, 1),  # the benchmark's depth: several chunks per KV head
    (1000, 1, 1024, True, 1),
    (255, 1, 300, True, 1),  # a chunk boundary
    (0, 7, 16, True, 1),  # a prompt: causal within the new tokens
    (100, 5, 128, True, 1),
    (300, 1, 512, False, 1),  # separate past and present buffers: past copied, the rest zero
    (0, 9, 9, False, 1),
    (40, 1, 64, True, 2),  # two batch rows
]


@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("scale", [None, 0.125])
@pytest.mark.parametrize(("past", "new", "capacity", "shared", "batch"), CASES)
def test_kernel_matches_onnxruntime(library, interleaved, scale, past, new, capacity, shared, batch) -> None:
    ref = session(gqa(ORT_DOMAIN, interleaved=interleaved, scale=scale))
    ours = session(gqa(DOMAIN, interleaved=interleaved, scale=scale), library)
    seed = past * 31 + new
    want = attend(ref, seed, past, new, capacity, shared, batch)
    got = attend(ours, seed, past, new, capacity, shared, batch)
    for name, a, b in zip(("output", "present_key", "present_value"), want, got, strict=True):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-5, err_msg=name)  # float32 sums in another order


def _kv_scales(per_channel: bool, hd: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    n = 2 * hd if per_channel else 1  # Shape's 2 KV heads
    return (0.02 + 0.05 * rng.random(n)).astype(np.float32), (0.02 + 0.05 * rng.random(n)).astype(np.float32)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize(("past", "new", "capacity", "shared", "batch"), CASES)
def test_int8_cache_matches_onnxruntime(library, per_channel, past, new, capacity, shared, batch) -> None:
    """rsedge export --kv-cache int8's form: new rows quantized as onnxruntime does (the same int8 codes), scores
    and values read through the scales."""
    scales = _kv_scales(per_channel)
    ref = session(gqa(ORT_DOMAIN, kv_scales=scales))
    ours = session(gqa(DOMAIN, kv_scales=scales), library)
    seed = past * 17 + new
    want = attend(ref, seed, past, new, capacity, shared, batch)
    got = attend(ours, seed, past, new, capacity, shared, batch)
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-4, err_msg="output")
    for a, b in zip(want[1:], got[1:], strict=True):
        assert a.dtype == b.dtype == np.int8
        assert np.abs(a.astype(np.int16) - b.astype(np.int16)).max() <= 1  # a rounding tie may go either way
        assert (a != b).mean() < 1e-3


@pytest.mark.parametrize("hd", [128, 32])  # 128: the other unrolled width; 32: the generic loop
def test_other_head_widths(library, hd) -> None:
    ref, ours = session(gqa(ORT_DOMAIN, hd=hd)), session(gqa(DOMAIN, hd=hd), library)
    for past, new in ((300, 1), (20, 3)):
        want, got = attend(ref, 5, past, new, 400, True, hd=hd), attend(ours, 5, past, new, 400, True, hd=hd)
        for a, b in zip(want, got, strict=True):
            np.testing.assert_allclose(b, a, rtol=0, atol=2e-5)


def test_one_thread_and_many_agree(library) -> None:
    one, two = session(gqa(DOMAIN), library, threads=1), session(gqa(DOMAIN), library, threads=2)
    for a, b in zip(attend(one, 9, 700, 1, 800, True), attend(two, 9, 700, 1, 800, True), strict=True):
        np.testing.assert_array_equal(a, b)  # chunks combined in a fixed order, whatever thread ran them


def test_a_position_beyond_the_rotary_cache_is_an_error(library) -> None:
    ours = session(gqa(DOMAIN), library)
    with pytest.raises(Exception, match="beyond the rotary cache"):
        attend(ours, 1, 2048, 1, 2048 + 8, True)


def test_the_library_is_built_once_and_a_damaged_one_rebuilt(library) -> None:
    again = build.library()
    assert again == library
    stamp = library.stat().st_mtime_ns
    assert build.library().stat().st_mtime_ns == stamp  # cached: not compiled again
    # damaged: its recorded sha256 no longer matches (a new file, not written in place: this process has the
    # library mapped, and rewriting a mapped file under a running kernel can fault)
    damaged = library.with_name(library.name + ".tmp")
    damaged.write_bytes(library.read_bytes() + b"\0")
    os.replace(damaged, library)
    rebuilt = build.library()
    assert rebuilt == library and (library.parent / f"{library.name}.sha256").read_text().strip() == build.sha256_file(
        library
    )


def test_without_the_header_the_reason_is_given(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("RSEDGE_ORT_INCLUDE", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "header_dirs", lambda: [tmp_path])
    with pytest.raises(KernelUnavailable, match=r"onnxruntime_c_api\.h"):
        build.library()


def test_a_failing_compiler_is_a_reason_not_a_crash(library, monkeypatch, tmp_path) -> None:
    fake = tmp_path / "cc"
    fake.write_text(
        "#!/bin/sh\n[ \"$1\" = --version ] && echo 'fake cc 1' && exit 0\necho 'fake: broken' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(KernelUnavailable, match="fake: broken"):
        build.library()
    assert not list(build._cache_root().glob("kernels-v1/*/.libgqa_decode-*"))  # no half-written library left


def _decoder_graph(bundle: Path) -> Path:
    return bundle / "decoder_expert0.onnx"


@pytest.fixture(scope="module")
def shared_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """FP32, GroupQueryAttention over one shared KV buffer per layer: the graph the kernel serves."""
    from rsedge.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("kernels") / "gqa-shared"
    export_bundle(tiny_checkpoint, out, precision="fp32", attention="gqa-shared", validate=False)
    return out


@pytest.fixture(scope="module")
def twin_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """INT4 with the INT8 prefill twin (the cpu target's form): the bundle whose decode steps take the kernel."""
    from rsedge.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("kernels") / "int4-twin"
    export_bundle(tiny_checkpoint, out, precision="int4", block_size=32, prefill="int8", validate=False)
    return out


def test_the_rewrite_moves_only_attention(shared_bundle) -> None:
    graph = _decoder_graph(shared_bundle)
    before = onnx.load(graph, load_external_data=False)
    after = onnx.ModelProto()
    after.ParseFromString(decode_graph(graph.read_bytes()))
    moved = [n for n in after.graph.node if n.domain == DOMAIN]
    assert moved and all(n.op_type == "GroupQueryAttention" for n in moved)
    assert len(moved) == sum(n.op_type == "GroupQueryAttention" for n in before.graph.node)
    assert [n.op_type for n in after.graph.node] == [n.op_type for n in before.graph.node]
    assert after.graph.initializer == before.graph.initializer  # the same weights, still external


def _gqa_graph(cache: int, args: list[str], **attrs) -> bytes:
    node = helper.make_node("GroupQueryAttention", args, ["o", "k", "v"], domain="com.microsoft", num_heads=2,
                            kv_num_heads=1, **attrs)
    inputs = [helper.make_tensor_value_info(n, cache, None) for n in ("pk", "pv")]
    return helper.make_model(helper.make_graph([node], "g", inputs, [])).SerializeToString()


def test_graphs_the_kernel_cannot_run_are_refused(tiny_bundle) -> None:
    with pytest.raises(KernelUnavailable, match="no GroupQueryAttention"):
        decode_graph(_decoder_graph(tiny_bundle).read_bytes())  # the portable attention form
    base = ["q", "", "", "pk", "pv", "s", "t"]
    with pytest.raises(KernelUnavailable, match="float32 or int8 KV cache"):
        decode_graph(_gqa_graph(TensorProto.FLOAT16, base))
    with pytest.raises(KernelUnavailable, match="needs k_scale and v_scale"):
        decode_graph(_gqa_graph(TensorProto.INT8, base))
    with pytest.raises(KernelUnavailable, match="packed QKV"):
        decode_graph(_gqa_graph(TensorProto.FLOAT, ["q", "k", "v", "pk", "pv", "s", "t"]))
    with pytest.raises(KernelUnavailable, match="attributes the kernel does not implement"):
        decode_graph(_gqa_graph(TensorProto.FLOAT, base, local_window_size=128))
    int8 = onnx.ModelProto()
    int8.ParseFromString(decode_graph(_gqa_graph(TensorProto.INT8, [*base, "", "", "", "", "", "ks", "vs"])))
    assert (int8.graph.node[0].domain, int8.graph.node[0].op_type) == (DOMAIN, "GroupQueryAttentionInt8")


def _decoders(bundle: Path, **kw) -> tuple[OrtCpuDecoder, OrtCpuDecoder]:
    """The bundle's expert-0 decoder with and without the kernel (an FP32 graph, whose numbers compare tightly;
    its prompt runs through the same graph: the kernel's prompt path)."""
    import json

    text = json.loads((bundle / "manifest.json").read_text())["model"]["text"]
    spec = DecoderSpec(text["num_hidden_layers"], text["num_key_value_heads"],
                       text["hidden_size"] // text["num_attention_heads"], shared_kv=True)
    graph = _decoder_graph(bundle)
    return tuple(OrtCpuDecoder(graph, spec, SessionConfig(threads=2, kernels=k), **kw) for k in (True, False))


def test_a_decoder_on_the_kernel_decodes_as_onnxruntime(library, shared_bundle) -> None:
    kernel, plain = _decoders(shared_bundle)
    assert (kernel.attention, plain.attention) == ("rsedge", "onnxruntime")
    hidden = int(kernel.session.get_inputs()[0].shape[-1])
    rng = np.random.default_rng(0)
    states = [d.new_state(96) for d in (kernel, plain)]
    prompt = rng.standard_normal((1, 40, hidden)).astype(np.float32)
    for d, st in zip((kernel, plain), states, strict=True):
        d.step(prompt, st)  # the prompt: the kernel's prompt path against onnxruntime's
    for _ in range(24):
        x = rng.standard_normal((1, 1, hidden)).astype(np.float32)
        a, b = (d.step(x, st).copy() for d, st in zip((kernel, plain), states, strict=True))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)  # FP32 graph: attention sums in another order only
        assert a.argmax() == b.argmax()


def test_kernels_off_and_unbuildable_fall_back_with_the_reason(shared_bundle, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("RSEDGE_KERNELS", "0")
    dec, _ = _decoders(shared_bundle)
    assert (dec.attention, dec.attention_note) == ("onnxruntime", "RSEDGE_KERNELS=0")
    monkeypatch.delenv("RSEDGE_KERNELS")
    monkeypatch.setattr(build, "header_dirs", lambda: [tmp_path])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    dec, _ = _decoders(shared_bundle)
    assert dec.attention == "onnxruntime" and "onnxruntime_c_api.h" in dec.attention_note
    st = dec.new_state(8)
    assert np.isfinite(dec.step(np.zeros((1, 1, int(dec.session.get_inputs()[0].shape[-1])), np.float32), st)).all()


def test_a_cpu_bundle_answers_the_same_on_the_kernel(library, twin_bundle, samples) -> None:
    from rsedge.runtime.bundle import Bundle
    from rsedge.runtime.pipeline import Pipeline

    on, off = Pipeline.load(twin_bundle), Pipeline(Bundle.open(twin_bundle), SessionConfig(kernels=False))
    for prompt in ("[VG] Where is the windmill?", "[CAP] Describe the image."):
        expert = on.choose_expert(prompt)
        a = on.generate([samples / "dior_05863.png"], prompt, max_new_tokens=16, keep_logits=True, ignore_eos=True)
        b = off.generate([samples / "dior_05863.png"], prompt, max_new_tokens=16, keep_logits=True, ignore_eos=True)
        assert (on.decoder(expert).attention, off.decoder(expert).attention) == ("rsedge", "onnxruntime")
        assert on.decoder(expert).prefill_attention == "rsedge"  # the INT8 prefill twin's prompt too
        assert attention_label(on.decoder(expert)) == "rsedge; prompt: rsedge"  # what rsedge bench reports
        assert attention_label(off.decoder(expert)) == "onnxruntime (kernels off (SessionConfig)); prompt: onnxruntime"
        assert list(a.tokens) == list(b.tokens)
        # INT4 MatMulNBits quantizes its inputs to int8 (accuracy_level 4): attention outputs differing in their
        # last bits can round an activation the other way, so logits agree to within that, not bit for bit.
        pairs = zip(a.step_logits, b.step_logits, strict=True)
        cosines = [float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) for x, y in pairs]
        assert min(cosines) > 0.999


def test_the_c_source_ships_with_the_package() -> None:
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'rsedge = ["data/**/*", "kernels/*.c"]' in pyproject
    assert os.path.isfile(build.SOURCES["gqa_decode"])


def test_rsedge_kernels_builds_and_says_where(library, monkeypatch, tmp_path) -> None:
    from click.testing import CliRunner

    from rsedge.cli import main

    ok = CliRunner().invoke(main, ["kernels"])
    assert ok.exit_code == 0 and str(library) in ok.output and ": on" in ok.output
    monkeypatch.setattr(build, "header_dirs", lambda: [tmp_path])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bad = CliRunner().invoke(main, ["kernels"])
    assert bad.exit_code == 1
    assert bad.output.count("\n") == 1 and bad.output.startswith("error: ") and "fetch_ort_headers.sh" in bad.output


def test_the_source_builds_for_a_jetson(tmp_path) -> None:
    """Orin's CPU (Cortex-A78AE): the same source through GCC's generic vectors to NEON. A cross compiler proves it
    compiles here; running it needs the board (the x86 tests above check the numbers)."""
    import shutil
    import subprocess

    cc = shutil.which("aarch64-linux-gnu-gcc")
    if cc is None:
        pytest.skip("no aarch64 cross compiler (apt-get install gcc-aarch64-linux-gnu)")
    try:
        include = build.find_header()
    except KernelUnavailable as e:
        pytest.skip(str(e))
    source, lib = str(build.SOURCES["gqa_decode"]), str(tmp_path / "k.so")
    cmd = [cc, *build.FLAGS, "-mcpu=cortex-a78ae", "-Werror", f"-I{include}", source, "-o", lib]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    symbols = subprocess.run(["aarch64-linux-gnu-nm", "-D", str(tmp_path / "k.so")], capture_output=True, text=True)
    assert " T RegisterCustomOps" in symbols.stdout
