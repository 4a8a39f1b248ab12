"""Stand-ins for TensorRT and a CUDA binding, for testing rsedge's TensorRT code on a machine without either.

:class:`FakeGpu` is "device memory" in host memory behind a fake ``cupy`` module or a fake cuda-python runtime
(``cuda.bindings.runtime``): every allocation, copy and stream synchronization is logged, and every address used
is checked to lie inside a live allocation (and, for a copy, on the right side of it).

:class:`FakeTensorRT` is a fake ``tensorrt`` module. Its builder "serializes" an engine as a JSON note of the ONNX
file and the optimization profile it was given; its runtime deserializes that into an engine that, on
``execute_async_v3``, reads every input from the device address set for it (with the shape set for it), runs the
ONNX graph with onnxruntime on the CPU, and writes every output to the address set for it. So a test through it
proves the addresses, offsets and shapes rsedge binds, not only which calls it makes. Like TensorRT 8.x, it binds
INT64 inputs as INT32 when its major version is below 10, and it refuses to deserialize an engine another version
built.
"""

from __future__ import annotations

import ctypes
import json
import threading
import time
import types
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from rsedge.runtime.sessions import SessionConfig, make_session

H2D, D2H = 1, 2


class FakeGpu:
    """Host memory posing as one GPU; ``events`` logs ("alloc", ptr, size), ("h2d"|"d2h", nbytes), ("sync",)
    and the fake engine's ("exec", graph, {tensor: (ptr, shape)})."""

    def __init__(self, name: str = "NVIDIA H200", capability: tuple[int, int] = (9, 0)) -> None:
        self.name, self.capability = name, capability
        self.live: dict[int, np.ndarray] = {}
        self.events: list[tuple] = []
        self.lock = threading.Lock()

    # -- memory -----------------------------------------------------------------------------------------------

    def malloc(self, nbytes: int) -> int:
        # Garbage, not zeros: nothing may rely on fresh device memory being zeroed.
        buf = np.full(max(nbytes, 1), 0x7F, dtype=np.uint8)
        ptr = buf.ctypes.data
        with self.lock:
            self.live[ptr] = buf
            self.events.append(("alloc", ptr, nbytes))
        return ptr

    def free(self, ptr: int) -> None:
        with self.lock:
            self.live.pop(ptr, None)

    def inside(self, ptr: int, nbytes: int) -> bool:
        return any(base <= ptr and ptr + nbytes <= base + buf.nbytes for base, buf in list(self.live.items()))

    def check(self, ptr: int, nbytes: int, what: str) -> None:
        if not self.inside(ptr, nbytes):
            raise AssertionError(f"{what}: {nbytes} bytes at {ptr:#x} are outside every live device allocation")

    def view(self, ptr: int, shape: tuple[int, ...], dtype: Any, what: str) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes == 0:
            return np.empty(shape, dtype)
        self.check(ptr, nbytes, what)
        raw = (ctypes.c_ubyte * nbytes).from_address(ptr)
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def memcpy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        if kind == H2D:
            self.check(dst, nbytes, "host->device copy destination")
            assert not self.inside(src, 1), "host->device copy from device memory"
            self.events.append(("h2d", nbytes))
        elif kind == D2H:
            self.check(src, nbytes, "device->host copy source")
            assert not self.inside(dst, 1), "device->host copy into device memory"
            self.events.append(("d2h", nbytes))
        else:
            raise AssertionError(f"unexpected copy kind {kind}")
        ctypes.memmove(dst, src, nbytes)

    # -- the bindings rsedge imports -------------------------------------------------------------------------

    def cupy_module(self) -> types.ModuleType:
        gpu = self

        class MemoryPointer:
            def __init__(self, nbytes: int) -> None:
                self.ptr = gpu.malloc(nbytes)
                weakref.finalize(self, gpu.free, self.ptr)

        class Stream:
            ptr = 0x5EED

            def __init__(self, non_blocking: bool = False) -> None:
                pass

            def synchronize(self) -> None:
                gpu.events.append(("sync",))

        class Device:
            def __init__(self, device_id: int) -> None:
                self.id = device_id

            def use(self) -> None:
                pass

        def memcpy_async(dst: int, src: int, size: int, kind: int, stream: int) -> None:
            assert stream == Stream.ptr
            gpu.memcpy(dst, src, size, kind)

        runtime = types.SimpleNamespace(
            memcpyHostToDevice=H2D,
            memcpyDeviceToHost=D2H,
            memcpyAsync=memcpy_async,
            getDeviceProperties=lambda i: {
                "name": gpu.name.encode(),
                "major": gpu.capability[0],
                "minor": gpu.capability[1],
            },
        )
        mod = types.ModuleType("cupy")
        mod.cuda = types.SimpleNamespace(Stream=Stream, Device=Device, alloc=MemoryPointer, runtime=runtime)
        return mod

    def cudart_module(self) -> types.ModuleType:
        gpu = self
        ok = "cudaSuccess"

        class Props:
            name = gpu.name.encode() + b"\0\0\0"  # the C char array, NUL padded
            major, minor = gpu.capability

        def sync(stream: int) -> tuple:
            gpu.events.append(("sync",))
            return (ok,)

        def memcpy_async(dst: int, src: int, n: int, kind: int, stream: int) -> tuple:
            gpu.memcpy(dst, src, n, kind)
            return (ok,)

        mod = types.ModuleType("cuda.bindings.runtime")
        mod.cudaError_t = types.SimpleNamespace(cudaSuccess=ok)
        mod.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=H2D, cudaMemcpyDeviceToHost=D2H)
        mod.cudaSetDevice = lambda i: (ok,)
        mod.cudaStreamCreate = lambda: (ok, 0x5EED)
        mod.cudaMalloc = lambda n: (ok, gpu.malloc(n))
        mod.cudaFree = lambda ptr: (gpu.free(ptr), (ok,))[1]
        mod.cudaMemcpyAsync = memcpy_async
        mod.cudaStreamSynchronize = sync
        mod.cudaGetDeviceProperties = lambda i: (ok, Props())
        return mod

    def install(self, monkeypatch: Any, binding: str = "cupy") -> None:
        """Make ``import cupy`` (or, with cupy unimportable, cuda-python's runtime) give this GPU."""
        import sys

        if binding == "cupy":
            monkeypatch.setitem(sys.modules, "cupy", self.cupy_module())
            return
        rt = self.cudart_module()
        cuda = types.ModuleType("cuda")
        bindings = types.ModuleType("cuda.bindings")
        bindings.runtime, cuda.bindings = rt, bindings
        monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
        monkeypatch.setitem(sys.modules, "cuda", cuda)
        monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", rt)

    # -- reading the log -----------------------------------------------------------------------------------------

    def segments(self) -> list[list[tuple]]:
        """The events split after each stream synchronization: one run of an engine per segment."""
        out, cur = [], []
        for e in self.events:
            cur.append(e)
            if e[0] == "sync":
                out.append(cur)
                cur = []
        if cur:
            out.append(cur)
        return out


_ORT_TO_TRT = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int64)": "INT64"}
_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64}


class FakeEngine:
    def __init__(self, trt: FakeTensorRT, meta: dict[str, Any]) -> None:
        self.trt, self.gpu = trt, trt.gpu
        self.onnx = Path(meta["onnx"])
        self.profile = {k: [tuple(s) for s in v] for k, v in meta["profile"].items()}
        self.session = make_session(self.onnx, SessionConfig())
        self.inputs = {a.name: a for a in self.session.get_inputs()}
        self.outputs = {a.name: a for a in self.session.get_outputs()}
        self.names = [*self.inputs, *self.outputs]

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name in self.inputs else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> str:
        arg = self.inputs.get(name) or self.outputs[name]
        dt = _ORT_TO_TRT[arg.type]
        if dt == "INT64" and self.trt.major < 10:  # TensorRT 8.x binds INT64 graph inputs as INT32
            dt = "INT32"
        return dt

    def get_tensor_shape(self, name: str) -> list[int]:
        arg = self.inputs.get(name) or self.outputs[name]
        return [d if isinstance(d, int) else -1 for d in arg.shape]

    def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
        assert index == 0
        if name not in self.profile:
            raise RuntimeError(f"{name} is not a dynamic input of this engine's profile")
        return list(self.profile[name])

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.gpu = engine, engine.gpu
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.setters: set[int] = set()  # threads that set shapes or addresses since the last execution

    def _touch(self) -> None:
        self.setters.add(threading.get_ident())
        time.sleep(0)  # let another thread run here: a step that is not atomic shows up as a mixed binding

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self._touch()
        arg = self.engine.inputs[name]
        if len(shape) != len(arg.shape):
            return False
        lo, _, hi = self.engine.profile.get(name, (shape, shape, shape))
        for d, static, a, b in zip(shape, arg.shape, lo, hi, strict=True):
            if (isinstance(static, int) and d != static) or not a <= d <= b:
                return False  # TensorRT logs the error and returns False
        self.shapes[name] = tuple(int(d) for d in shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self._touch()
        assert name in self.engine.names, name
        self.addresses[name] = int(ptr)
        return True

    def _dims(self) -> dict[str, int]:
        dims: dict[str, int] = {}
        for name, arg in self.engine.inputs.items():
            for sym, d in zip(arg.shape, self.shapes.get(name, ()), strict=False):
                if isinstance(sym, str):
                    dims[sym] = d
        if "past_sequence_length" in dims and "sequence_length" in dims:
            dims["total_sequence_length"] = dims["past_sequence_length"] + dims["sequence_length"]
        return dims

    def get_tensor_shape(self, name: str) -> list[int]:
        if name in self.engine.inputs:
            return list(self.shapes.get(name, self.engine.get_tensor_shape(name)))
        dims = self._dims()
        return [d if isinstance(d, int) else dims.get(d, -1) for d in self.engine.outputs[name].shape]

    def execute_async_v3(self, stream: int) -> bool:
        e = self.engine
        assert self.setters <= {threading.get_ident()}, "another thread changed this context's bindings mid-step"
        self.setters = set()
        feeds, bound, regions = {}, {}, []
        for name in e.inputs:
            assert name in self.shapes and name in self.addresses, f"{name} has no shape or address"
            shape, ptr = self.shapes[name], self.addresses[name]
            dtype = _NP[e.get_tensor_dtype(name)]
            arr = self.gpu.view(ptr, shape, dtype, f"input {name}").copy()
            feeds[name] = arr.astype(np.int64) if arr.dtype == np.int32 else arr
            bound[name] = (ptr, shape)
            regions.append((name, ptr, arr.nbytes))
        results = e.session.run(None, feeds)
        for name, value in zip(e.outputs, results, strict=True):
            assert name in self.addresses, f"output {name} has no address"
            shape, ptr = tuple(self.get_tensor_shape(name)), self.addresses[name]
            assert value.shape == shape, (name, value.shape, shape)
            nbytes = value.nbytes
            for other, p, n in regions:  # TensorRT reads its inputs while it writes its outputs
                assert n == 0 or nbytes == 0 or ptr + nbytes <= p or p + n <= ptr, f"{name} overlaps {other}"
            self.gpu.view(ptr, shape, _NP[e.get_tensor_dtype(name)], f"output {name}")[...] = value
            bound[name] = (ptr, shape)
        self.gpu.events.append(("exec", e.onnx.name, bound))
        return True


class FakeTensorRT(types.ModuleType):
    """A fake ``tensorrt`` module of one version on one FakeGpu."""

    def __init__(self, version: str, gpu: FakeGpu) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.major = int(version.split(".")[0])
        self.gpu = gpu
        self.built: list[dict[str, Any]] = []
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level: int) -> None:
                pass

        class Network:
            def __init__(self, flags: int) -> None:
                self.flags, self.inputs, self.path = flags, [], ""

            @property
            def num_inputs(self) -> int:
                return len(self.inputs)

            def get_input(self, i: int) -> Any:
                return self.inputs[i]

        class Parser:
            num_errors = 0

            def __init__(self, network: Network, logger: Logger) -> None:
                self.network = network

            def parse_from_file(self, path: str) -> bool:
                import onnx

                model = onnx.load(path, load_external_data=False)
                self.network.path = path
                self.network.inputs = [
                    types.SimpleNamespace(
                        name=vi.name,
                        shape=[d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim],
                    )
                    for vi in model.graph.input
                ]
                return True

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, list[list[int]]] = {}

            def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
                self.shapes[name] = [list(lo), list(opt), list(hi)]

        class Config:
            def __init__(self) -> None:
                self.flags: list[str] = []
                self.profiles: list[Profile] = []

            def set_memory_pool_limit(self, pool: int, size: int) -> None:
                pass

            def set_flag(self, flag: str) -> None:
                self.flags.append(flag)

            def add_optimization_profile(self, p: Profile) -> None:
                self.profiles.append(p)

        class Builder:
            def __init__(self, logger: Logger) -> None:
                pass

            def create_network(self, flags: int) -> Network:
                return Network(flags)

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> bytes:
                profile = config.profiles[0].shapes if config.profiles else {}
                meta = {"version": fake.__version__, "onnx": network.path, "profile": profile, "flags": config.flags}
                fake.built.append(meta)
                return json.dumps(meta).encode()

        class Runtime:
            def __init__(self, logger: Logger) -> None:
                pass

            def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
                try:
                    meta = json.loads(data)
                except ValueError:
                    return None
                if meta.get("version") != fake.__version__:
                    return None  # TensorRT refuses an engine another version serialized
                return FakeEngine(fake, meta)

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = Logger, Builder, Parser, Runtime
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=5)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
        self.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")
        self.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
        self.DataType = types.SimpleNamespace(**{k: k for k in _NP})

    @staticmethod
    def nptype(dtype: str) -> type:
        return _NP[dtype]


def install(monkeypatch: Any, version: str = "10.3.0", gpu: FakeGpu | None = None, binding: str = "cupy"):
    """Put a FakeTensorRT of ``version`` and ``gpu``'s CUDA binding where rsedge imports them; (trt, gpu)."""
    import sys

    gpu = gpu or FakeGpu()
    gpu.install(monkeypatch, binding)
    trt = FakeTensorRT(version, gpu)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt, gpu
