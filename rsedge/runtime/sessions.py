"""onnxruntime sessions for a bundle's graphs: the execution providers a device means, with their options."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rsedge.errors import OptionError
from rsedge.runtime import hugepages

# Execution providers per device, first choice first. The CPU provider stays last as onnxruntime's
# fallback for the few shape ops a GPU provider leaves to the host.
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int8)": np.int8,  # an INT8 KV cache (rsedge export --kv-cache int8)
}
ENV_ALLOCATORS = "session.use_env_allocators"  # the session config entry that takes the process's shared arena
# Where a graph given as bytes finds its external data (onnxruntime >= 1.17).
EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"


def default_trt_cache() -> Path:
    """Where TensorRT engines built through onnxruntime are kept between runs (per user, not in the bundle)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rsedge" / "trt"


@dataclass(frozen=True)
class SessionConfig:
    device: str = "cpu"
    threads: int | None = None  # None: onnxruntime picks (one per physical core)
    device_id: int = 0
    # CUDA graphs for decode steps (onnxruntime replays the captured step; prefill runs uncaptured).
    cuda_graph: bool = False
    # TensorRT through onnxruntime: engines built once per graph and GPU, then loaded from here.
    trt_cache: Path | None = None
    trt_fp16: bool = True
    # CPU: every session allocates from one arena of the process (see use_shared_cpu_arena) instead of its own.
    shared_arena: bool = True
    # CPU: a new session's written memory (prepacked weights) collapsed into huge pages in the background
    # (see rsedge.runtime.hugepages; RSEDGE_HUGE_PAGES=0 turns it off for a process).
    huge_pages: bool = True
    # CPU: graphs onnxruntime optimized once are kept here and loaded without optimizing again (graph_cache.py);
    # None: the per-user default folder. Only graphs make_session is given a content digest for use it.
    graph_cache: Path | None = None
    use_graph_cache: bool = True
    # CPU: decoders with an INT8 prefill twin run their decode steps' attention on rsedge's kernel when it can be
    # built on this machine (rsedge.kernels; RSEDGE_KERNELS=0 turns it off for a process).
    kernels: bool = True

    def __post_init__(self) -> None:
        if self.device not in PROVIDERS:
            raise OptionError(f"unknown device {self.device!r}; choose from {', '.join(PROVIDERS)}")
        if self.threads is not None and not 1 <= self.threads <= (os.cpu_count() or 1) * 4:
            raise OptionError(f"threads must be between 1 and {(os.cpu_count() or 1) * 4}, got {self.threads}")
        if self.device_id < 0:
            raise OptionError(f"device_id must be >= 0, got {self.device_id}")
        if self.cuda_graph and self.device != "cuda":
            raise OptionError("CUDA graphs need --device cuda")

    @property
    def shares_cpu_arena(self) -> bool:
        """Whether sessions take the process's shared CPU arena: on the CPU device only (the GPU devices'
        activations live in their providers' device arenas, which this does not touch)."""
        return self.shared_arena and self.device == "cpu"


def provider_options(cfg: SessionConfig, name: str, cache_key: str = "") -> dict[str, Any]:
    """The options rsedge passes each provider (strings, as onnxruntime's Python API expects)."""
    if name == "CUDAExecutionProvider":
        return {
            "device_id": str(cfg.device_id),
            # Grow the arena by what is asked: a 0.5B decoder must not reserve a power-of-two of a Jetson's RAM.
            "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_algo_search": "HEURISTIC",
            "do_copy_in_default_stream": "1",
            "enable_cuda_graph": "1" if cfg.cuda_graph else "0",
        }
    if name == "TensorrtExecutionProvider":
        root = cfg.trt_cache or default_trt_cache()
        cache = root / cache_key if cache_key else root
        return {
            "device_id": str(cfg.device_id),
            # Without the engine cache every start rebuilds every engine (minutes on an Orin).
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(cache),
            "trt_fp16_enable": "True" if cfg.trt_fp16 else "False",
        }
    return {}


def providers_for(cfg: SessionConfig, available: set[str], cache_key: str = "") -> list[tuple[str, dict[str, Any]]]:
    """The (provider, options) list for ``cfg.device``, or OptionError naming what this onnxruntime lacks."""
    wanted = PROVIDERS[cfg.device]
    if wanted[0] not in available:
        raise OptionError(
            f"device {cfg.device!r} needs {wanted[0]}, which this onnxruntime lacks "
            f"(available: {', '.join(sorted(available))}); install onnxruntime-gpu or use --device cpu"
        )
    return [(p, provider_options(cfg, p, cache_key)) for p in wanted if p in available]


def make_session(
    path: Path,
    cfg: SessionConfig,
    cache_key: str = "",
    content: str | None = None,
    model: bytes | None = None,
    custom_ops: Path | None = None,
) -> Any:
    """An onnxruntime InferenceSession of ``path`` on ``cfg.device``.

    ``model``: the graph to run instead of ``path``'s (a rewrite of it: its external data is read from ``path``'s
    folder); ``custom_ops``: a library of custom op kernels the graph uses (:mod:`rsedge.kernels`).

    ``content``: a digest of the graph's content (``Bundle.graph_digest``); on the CPU it lets the session come
    from the optimized-graph cache (:mod:`rsedge.runtime.graph_cache`): onnxruntime optimizes the graph once per
    machine and version, later sessions load the saved result with optimizations off.
    """
    import onnxruntime as ort

    chosen = providers_for(cfg, set(ort.get_available_providers()), cache_key)
    if cfg.device != "cpu":
        _preload_gpu_libraries(ort)
    if cfg.device == "tensorrt":
        Path(chosen[0][1]["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
    level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

    def create(graph: Path, level: Any, save: dict[str, str] | None = None) -> Any:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        if cfg.threads:
            opts.intra_op_num_threads = cfg.threads
        opts.log_severity_level = 3
        if cfg.shares_cpu_arena:
            use_shared_cpu_arena(ort, opts)
        if custom_ops is not None:
            opts.register_custom_ops_library(str(custom_ops))
        if model is not None:
            opts.add_session_config_entry(EXTERNAL_FOLDER, str(path.parent))
        if save:
            opts.optimized_model_filepath = save["path"]
            for k, v in save.items():
                if k != "path":
                    opts.add_session_config_entry(k, v)
        session = ort.InferenceSession(
            model if model is not None else str(graph),
            sess_options=opts,
            providers=[p for p, _ in chosen],
            provider_options=[o for _, o in chosen],
        )
        # onnxruntime falls back to the next provider when the first cannot start (e.g. TensorRT's libraries are
        # missing) and only logs it: a --device tensorrt run would silently be a CUDA run. Refuse instead.
        running = session.get_providers()
        if chosen[0][0] not in running:
            raise OptionError(
                f"device {cfg.device!r}: {chosen[0][0]} could not start on this machine (onnxruntime fell back to "
                f"{running[0]}; its reason is in the log above); install its libraries or choose another --device"
            )
        return session

    if model is not None or not (content and cfg.device == "cpu" and cfg.use_graph_cache):
        session = create(path, level)
    else:
        from rsedge.runtime.graph_cache import OptimizedGraphCache, entry_key

        key = entry_key(content, ort.__version__, [p for p, _ in chosen], str(level))
        session = OptimizedGraphCache(cfg.graph_cache).session(
            key,
            path,
            load=lambda graph: create(graph, ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
            optimize=lambda graph, save: create(graph, level, save),
        )
    if cfg.huge_pages and cfg.device == "cpu":
        hugepages.collapse_soon()
    return session


_ARENA_LOCK = threading.Lock()
_ARENA_REGISTERED = False
_ALREADY_REGISTERED = "already been registered"  # onnxruntime < 1.2x refuses a second registration with this


def use_shared_cpu_arena(ort: Any, opts: Any) -> None:
    """Make a session allocate from the process's one CPU arena, registered with onnxruntime on first use.

    A session otherwise grows an arena of its own to its largest run (a prefill's activations) and keeps it for
    its life: a service that has used the vision graph and three experts holds four. One shared arena holds what
    runs at once. onnxruntime keeps a registered allocator for the life of the process, so this registers once.
    """
    global _ARENA_REGISTERED
    with _ARENA_LOCK:
        if not _ARENA_REGISTERED:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            # Power-of-two growth (0), as a session's own arena: growing by what is asked (1) made decode steps
            # ~10% slower on the full-size INT4 bundle and held more memory (README, "Memory per expert").
            cfg = ort.OrtArenaCfg({"arena_extend_strategy": 0})
            try:
                ort.create_and_register_allocator(info, cfg)
            except RuntimeError as e:  # another user of this process registered one first: sessions share that
                if _ALREADY_REGISTERED not in str(e):
                    raise
            _ARENA_REGISTERED = True
    opts.add_session_config_entry(ENV_ALLOCATORS, "1")


_PRELOADED = False


def _preload_gpu_libraries(ort: Any) -> None:
    """Load CUDA and cuDNN from the nvidia-* pip wheels, once, where onnxruntime-gpu (>= 1.21) offers it.

    A pip-installed onnxruntime-gpu finds those libraries only this way; on a Jetson the system's CUDA is
    found by the loader and there are no such wheels, so nothing is done.
    """
    global _PRELOADED
    if _PRELOADED or not hasattr(ort, "preload_dlls"):
        return
    import importlib.util

    if importlib.util.find_spec("nvidia") is not None:
        ort.preload_dlls()
    _PRELOADED = True
