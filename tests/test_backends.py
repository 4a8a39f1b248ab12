"""Decoder backends under `Pipeline`: per-request state, thread safety, and the CUDA path's transfers.

The CUDA backend's binding logic runs here on a CPU session through a recording stand-in for the device:
its "device memory" is host memory, and every bind and host<->device transfer is counted. The answers
must equal the CPU backend's bit for bit, and a decode step may move only the new token's embedding and
position up and one logits row down.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rsedge.errors import OptionError
from rsedge.runtime.backends import DecoderSpec, backend_class
from rsedge.runtime.backends.ort_cpu import OrtCpuDecoder
from rsedge.runtime.backends.ort_cuda import OrtCudaDecoder
from rsedge.runtime.pipeline import Pipeline
from rsedge.runtime.sessions import SessionConfig, make_session

IMAGE = "dior_05863.png"
PAIR = ("levircc_test_000289_A.png", "levircc_test_000289_B.png")
# One prompt per expert of the default router: [CAP] -> 0, [VG] -> 1, [SEG] -> 2.
REQUESTS = [
    ((IMAGE,), "[CAP] Describe this image briefly."),
    ((IMAGE,), "[VG] Where is the windmill?"),
    ((IMAGE,), "[SEG] building."),
    (PAIR, "[CCD] Please briefly describe the changes in these two images."),
]


class TransferLog:
    def __init__(self) -> None:
        self.runs: list[dict[str, int]] = []
        self.pending = {"h2d": 0, "d2h": 0}
        self.host_bound_kv: list[str] = []


class RecordingBinding:
    """An IOBinding stand-in: "cuda" binds go to the CPU session at the same (host) address, and what
    would cross the bus is counted."""

    def __init__(self, io: Any, log: TransferLog) -> None:
        self.io, self.log = io, log
        self.cpu_outputs: dict[str, int] = {}

    def bind_input(self, name: str, device: str, device_id: int, dtype: Any, shape: Any, ptr: int) -> None:
        if name.startswith("past_key_values") and device != "cuda":
            self.log.host_bound_kv.append(name)
        self.io.bind_input(name, "cpu", 0, dtype, shape, ptr)

    def bind_output(self, name: str, device: str, device_id: int, dtype: Any, shape: Any, ptr: int) -> None:
        if device == "cpu":  # produced on the device, copied into host memory after every run
            self.cpu_outputs[name] = int(np.prod(shape)) * np.dtype(dtype).itemsize
        else:
            self.cpu_outputs.pop(name, None)
        if name.startswith("present") and device != "cuda":
            self.log.host_bound_kv.append(name)
        self.io.bind_output(name, "cpu", 0, dtype, shape, ptr)

    def bind_cpu_input(self, name: str, arr: np.ndarray) -> None:
        self.log.pending["h2d"] += arr.nbytes
        self.io.bind_cpu_input(name, arr)


class RecordingSession:
    def __init__(self, session: Any, log: TransferLog) -> None:
        self.session, self.log = session, log

    def get_inputs(self) -> Any:
        return self.session.get_inputs()

    def get_outputs(self) -> Any:
        return self.session.get_outputs()

    def io_binding(self) -> RecordingBinding:
        return RecordingBinding(self.session.io_binding(), self.log)

    def run_with_iobinding(self, io: RecordingBinding) -> None:
        self.session.run_with_iobinding(io.io)
        self.log.runs.append({"h2d": self.log.pending["h2d"], "d2h": sum(io.cpu_outputs.values())})
        self.log.pending = {"h2d": 0, "d2h": 0}


def recording_cuda_backend(log: TransferLog) -> type[OrtCudaDecoder]:
    class RecordingCudaDecoder(OrtCudaDecoder):
        def __init__(self, path: Path, spec: DecoderSpec, cfg: SessionConfig, cache_key: str = "") -> None:
            session = RecordingSession(make_session(path, SessionConfig(threads=cfg.threads)), log)
            super().__init__(path, spec, cfg, session=session)

        def _allocate(self, nbytes: int, zero: bool) -> tuple[Any, int]:
            buf = np.zeros(nbytes, np.uint8) if zero else np.full(nbytes, 0x7F, np.uint8)  # NaN-ish garbage
            return buf, buf.ctypes.data

    return RecordingCudaDecoder


def _answer(pipe: Pipeline, samples: Path, paths: tuple[str, ...], prompt: str, n: int = 12):
    return pipe.generate([samples / p for p in paths], prompt, max_new_tokens=n, keep_logits=True, ignore_eos=True)


def test_registry_names_every_device() -> None:
    assert backend_class("cpu") is OrtCpuDecoder
    assert backend_class("cuda") is OrtCudaDecoder
    assert issubclass(backend_class("tensorrt"), OrtCudaDecoder)


@pytest.fixture(scope="module")
def shared_kv_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    from rsedge.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "gqa-shared"
    export_bundle(tiny_checkpoint, out, precision="fp32", attention="gqa-shared")
    return out


@pytest.mark.parametrize("form", ["standard", "gqa-shared"])
def test_cuda_binding_keeps_cache_on_device(form, request, samples) -> None:
    from rsedge.runtime.bundle import Bundle

    bundle = request.getfixturevalue("tiny_bundle" if form == "standard" else "shared_kv_bundle")
    # onnxruntime's attention on both sides (the fake CUDA device runs onnxruntime's CPU kernels): bit-equal logits
    cpu = Pipeline(Bundle.open(bundle), SessionConfig(kernels=False))
    fake = Pipeline.load(bundle)
    log = TransferLog()
    fake.backend = recording_cuda_backend(log)
    for paths, prompt in REQUESTS:
        want, got = _answer(cpu, samples, paths, prompt), _answer(fake, samples, paths, prompt)
        assert got.tokens == want.tokens
        for a, b in zip(got.step_logits, want.step_logits, strict=True):
            np.testing.assert_array_equal(a, b)
    assert not log.host_bound_kv, "the KV cache was bound in host memory"
    hidden = cpu.bundle.model["text"]["hidden_size"]
    vocab = cpu.bundle.model["text"]["vocab_size"]
    dec = fake.decoder(0)
    per_step = {"h2d": hidden * dec.dtype.itemsize + 8, "d2h": vocab * 4}  # one embedding row + one position id
    decode_steps = [r for r in log.runs if r["h2d"] == per_step["h2d"]]
    assert len(decode_steps) == len(REQUESTS) * 11  # every step after each prefill
    assert all(r == per_step for r in decode_steps)
    prefills = [r for r in log.runs if r["h2d"] != per_step["h2d"]]
    assert len(prefills) == len(REQUESTS) and all(r["d2h"] == vocab * 4 for r in prefills)


def test_concurrent_requests_equal_serial_answers(tiny_bundle, samples) -> None:
    pipe = Pipeline.load(tiny_bundle, threads=1)
    serial = {prompt: _answer(pipe, samples, paths, prompt, 16).tokens for paths, prompt in REQUESTS}
    shared = Pipeline.load(tiny_bundle, threads=1)  # sessions created by the racing threads themselves
    results: list[tuple[str, list[int]]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(k: int) -> None:
        try:
            barrier.wait()
            for j in range(5):
                paths, prompt = REQUESTS[(k + j) % len(REQUESTS)]
                results.append((prompt, _answer(shared, samples, paths, prompt, 16).tokens))
        except BaseException as e:  # surfaced below with the thread's own traceback
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(results) == 40
    assert len(shared._decoders) == 3  # one session per expert, however many threads raced to make it
    wrong = [p for p, toks in results if toks != serial[p]]
    assert not wrong, f"{len(wrong)} of 40 concurrent answers differ from the serial ones"


def test_state_refuses_overrun(tiny_bundle) -> None:
    pipe = Pipeline.load(tiny_bundle)
    dec = pipe.decoder(0)
    state = dec.new_state(4)
    dec.step(np.zeros((1, 3, pipe.bundle.model["text"]["hidden_size"]), dec.dtype), state)
    with pytest.raises(Exception, match="KV cache full"):
        dec.step(np.zeros((1, 2, pipe.bundle.model["text"]["hidden_size"]), dec.dtype), state)
    assert state.length == 3


def test_warmup_moves_session_creation_out_of_the_first_request(tiny_bundle, samples, monkeypatch) -> None:
    import rsedge.runtime.backends.ort_decoder as ort_decoder
    import rsedge.runtime.pipeline as pipeline

    pipe = Pipeline.load(tiny_bundle, warmup=True)
    router = pipe.bundle.router
    assert sorted(pipe._decoders) == sorted({*router["table"].values(), router["default"]})
    assert pipe._vision is not None
    made: list[Path] = []

    def counting(path, cfg, cache_key=""):
        made.append(path)
        return make_session(path, cfg, cache_key)

    monkeypatch.setattr(pipeline, "make_session", counting)
    monkeypatch.setattr(ort_decoder, "make_session", counting)
    for paths, prompt in REQUESTS:
        _answer(pipe, samples, paths, prompt, 4)
    assert made == []


def test_prepare_creates_the_request_sessions_at_open_without_running_them(tiny_bundle, samples, monkeypatch) -> None:
    import rsedge.runtime.pipeline as pipeline

    pipe = Pipeline.load(tiny_bundle)
    prompt = REQUESTS[0][1]
    expert = pipe.choose_expert(prompt)
    took = pipe.prepare([expert])
    assert set(took) == {"vision", f"decoder_expert{expert}"} and all(ms > 0 for ms in took.values())
    assert pipe._vision is not None and list(pipe._decoders) == [expert]  # only the expert the request needs
    session = pipe.decoder(expert).session
    ran: list[str] = []
    inner = session.run_with_iobinding
    session.run_with_iobinding = lambda *a: ran.append("decoder") or inner(*a)
    import rsedge.runtime.backends.ort_cpu as ort_cpu

    fail = lambda *a, **k: pytest.fail("a session created in the request")  # noqa: E731
    monkeypatch.setattr(pipeline, "make_session", fail)
    monkeypatch.setattr(ort_cpu, "make_session", fail)
    _answer(pipe, samples, REQUESTS[0][0], prompt, 4)
    assert len(ran) == 4  # the prepared decoder ran the request (prompt + 3 steps), created before it


def test_a_provider_that_cannot_start_is_refused(tiny_bundle, tmp_path, monkeypatch) -> None:
    """onnxruntime falls back to the next provider when TensorRT's libraries are missing (seen on the GPU
    machine); a --device tensorrt run must not silently become a CUDA run."""
    import onnxruntime as ort

    class FellBack:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.asked = kwargs["providers"]

        def get_providers(self) -> list[str]:
            return self.asked[1:]

    monkeypatch.setattr(ort, "get_available_providers", lambda: list(PROVIDERS_ALL))
    monkeypatch.setattr(ort, "InferenceSession", FellBack)
    cfg = SessionConfig(device="tensorrt", trt_cache=tmp_path)
    with pytest.raises(OptionError, match="TensorrtExecutionProvider could not start"):
        make_session(tiny_bundle / "vision.onnx", cfg)
    monkeypatch.setattr(FellBack, "get_providers", lambda self: self.asked)
    assert make_session(tiny_bundle / "vision.onnx", cfg).asked[0] == "TensorrtExecutionProvider"


PROVIDERS_ALL = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
