"""The Python API: load a bundle, answer a prompt about one or more images.

numpy + onnxruntime + tokenizers + Pillow only; the CLI and the ground-station service are thin layers
over :class:`Pipeline`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from rsedge.errors import BundleError, OptionError, PromptError
from rsedge.runtime import ort_support
from rsedge.runtime.backends import DecoderBackend, DecoderSpec, backend_class
from rsedge.runtime.bundle import Bundle
from rsedge.runtime.engines import EngineSet
from rsedge.runtime.families import family_for
from rsedge.runtime.images import load_image, validate_image
from rsedge.runtime.outputs import Box, RleMask
from rsedge.runtime.reasoning import Reasoning, parse_reasoning
from rsedge.runtime.sampling import Sampler, Sampling
from rsedge.runtime.sessions import ORT_DTYPES, SessionConfig, make_session
from rsedge.runtime.think import ThinkMarkers, ThinkOptions, decoded_tail_open, monitor_for

ImageInput = str | Path | Image.Image
MAX_NEW_TOKENS_LIMIT = 32000  # upstream demo's budget
# Portable graphs hold one call's attention scores whole (4 bytes x heads x S x (P+S)): a long prompt goes
# in calls of this many tokens, so memory grows linearly with it (8k tokens, full size: 12.1 -> 4.7 GB).
PREFILL_CHUNK = 1024


def stream_tail(streamed: str, text: str) -> str:
    """What a token stream still owes once decoding stops: DecodeStream holds back the bytes of an unfinished UTF-8
    character (an answer cut by max_new_tokens or a cancel mid-character), which the full decode renders as U+FFFD,
    so the pieces alone would miss the answer's last character. Empty when the stream already holds ``text``."""
    return text[len(streamed) :] if text.startswith(streamed) else ""


@dataclass
class Answer:
    text: str
    tokens: list[int]
    tag: str | None
    expert: int
    boxes: list[Box] = field(default_factory=list)
    mask: RleMask | None = None
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    prompt_tokens: int = 0
    stopped_by: str = "eos"
    timings: dict[str, float] = field(default_factory=dict)
    step_logits: list[np.ndarray] | None = None
    # The text read as a reasoning answer (parse_reasoning), when it has think / answer tags or think options were
    # given; a family's parse maps its boxes (map_boxes) into ``boxes`` and their labels into ``box_labels``.
    reasoned: Reasoning | None = None
    box_labels: list[str | None] = field(default_factory=list)
    think: dict[str, Any] | None = None  # ThinkMonitor.report() when a think budget or think off was asked

    @property
    def reasoning(self) -> str | None:
        return None if self.reasoned is None else self.reasoned.reasoning

    @property
    def final_answer(self) -> str | None:
        """The answer without its reasoning (the <answer> block's text); None for an answer that is not a reasoning
        answer (its text is the answer)."""
        return None if self.reasoned is None else self.reasoned.answer

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "text": self.text,
            "tag": self.tag,
            "expert": self.expert,
            "tokens": len(self.tokens),
            "token_ids": [int(t) for t in self.tokens],  # scripts compare runs by ids, not by decoded text
            "prompt_tokens": self.prompt_tokens,
            "stopped_by": self.stopped_by,
            "image_sizes": [list(s) for s in self.image_sizes],
            "timings_ms": {k: round(v, 3) for k, v in self.timings.items()},
        }
        if self.boxes:
            out["boxes"] = [b.to_list() for b in self.boxes]
        if self.mask is not None:
            out["mask"] = {"labels": self.mask.labels, "grid": list(self.mask.grid.shape)}
        if self.final_answer is not None:  # only reasoning answers: other answers' JSON is as it was
            out["reasoning"], out["answer"] = self.reasoning, self.final_answer
            if any(label is not None for label in self.box_labels):
                out["box_labels"] = list(self.box_labels)
        if self.think is not None:
            out["think"] = dict(self.think)
        return out


class Pipeline:
    def __init__(self, bundle: Bundle, session: SessionConfig | None = None, engines: EngineSet | None = None) -> None:
        self.session_cfg = session or SessionConfig()
        # A bundle carrying two decoder forms runs the one this device takes (MatMulNBits on onnxruntime's CPU and
        # CUDA providers, Q/DQ on TensorRT); from here on it reads as a one-form bundle of that form.
        self.bundle = bundle = bundle.for_device("tensorrt-engine" if engines is not None else self.session_cfg.device)
        if engines is None:  # onnxruntime runs the graphs: one too old for them is refused before any session
            ort_support.check_onnxruntime(bundle.manifest, str(bundle.root), self.session_cfg.device)
        root = bundle.root
        self.tokenizer = Tokenizer.from_file(str(root / bundle.manifest["tokenizer"]["file"]))
        self.stop_ids = set(bundle.manifest["tokenizer"]["stop_token_ids"])
        self.embed_tokens = bundle.array("embed_tokens")
        # Quantized bundles keep the table as per-row INT8; only looked-up rows are dequantized.
        self.embed_scales = bundle.array("embed_scales") if "embed_scales" in bundle.manifest["arrays"] else None
        # Prompt, images, routing and answers: the manifest's architecture picks who reads them.
        self.family = family_for(bundle, self.tokenizer)
        text = bundle.model["text"]
        self.layers, self.kv_heads = text["num_hidden_layers"], text["num_key_value_heads"]
        self.head_dim = text["hidden_size"] // text["num_attention_heads"]
        self._vision = None
        self._graphs: dict[str, Any] = {}  # the manifest's other graphs (run_graph), by key
        self._decoders: dict[int, DecoderBackend] = {}
        # Sessions are created on first use; the lock makes two threads' first requests create one, not two.
        self._load_lock = threading.Lock()  # decoders
        self._vision_lock = threading.Lock()  # apart: a decoder may load while the vision graph loads and runs
        # Checked TensorRT engines of this bundle (rsedge build-engines) run every graph when given.
        self.engines = engines
        self.backend = backend_class("tensorrt-engine" if engines is not None else self.session_cfg.device)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "cpu",
        threads: int | None = None,
        verify: str = "sha256",
        trust: Sequence[str | Path | bytes] | None = None,
        warmup: bool = False,
        engines: str | Path | None = None,
    ) -> Pipeline:
        """``trust``: public keys (files or bytes); when given, only a bundle one of them signed loads.
        ``warmup``: create every session now and run each once (see :meth:`warmup`).
        ``engines``: a folder from ``rsedge build-engines`` of this bundle, checked (bundle, TensorRT version, GPU,
        engine hashes) before use; its engines then run the vision graph and every decoder."""
        bundle, cfg = Bundle.open(path, verify=verify, trust=trust), SessionConfig(device=device, threads=threads)
        bundle = bundle.for_device("tensorrt-engine" if engines is not None else device)  # the engines' form
        checked = None if engines is None else EngineSet.open(engines, bundle, device_id=cfg.device_id)
        pipe = cls(bundle, cfg, engines=checked)
        if warmup:
            pipe.warmup()
        return pipe

    def prepare(self, experts: Sequence[int], vision: bool = True) -> dict[str, float]:
        """Create the vision session (unless ``vision`` is False: a text-only request) and the decoders of
        ``experts`` now, side by side (onnxruntime builds sessions without the GIL), without running them: what a
        first request would otherwise do before its first graph. Returns ms per part (each from the start, so the
        largest is the wall time)."""
        t0 = time.perf_counter()
        parts: dict[str, Callable[[], Any]] = {"vision": self.vision} if vision else {}
        parts.update({f"decoder_expert{e}": (lambda e=e: self.decoder(e)) for e in experts})
        took: dict[str, float] = {}

        def create(name: str) -> None:
            parts[name]()
            took[name] = (time.perf_counter() - t0) * 1e3

        with ThreadPoolExecutor(len(parts)) as pool:
            for done in [pool.submit(create, name) for name in parts]:
                done.result()  # a session that cannot be created raises here, as it would in the request
        return took

    def warmup(self, experts: Sequence[int] | None = None, prompt_tokens: int | None = None) -> dict[str, float]:
        """Create the vision session and the decoders of ``experts`` (default: every expert the router can
        pick) and run each once on a blank input: a prefill of ``prompt_tokens`` (default: one image's visual
        tokens and a short question) and a decode step after it.

        Session creation and a provider's first-run set-up (kernel loading, the memory arena grown to a real
        prompt's size, cuDNN and cuBLAS handles) then happen here instead of inside a service's first request.
        Returns ms per part.
        """
        took: dict[str, float] = {}
        t0 = time.perf_counter()
        visual = self.image_tokens(self.family.blank_image())
        took["vision"] = (time.perf_counter() - t0) * 1e3
        if experts is None:
            r = self.bundle.router
            experts = sorted({int(e) for e in r["table"].values()} | {int(r["default"])})
        n = prompt_tokens or int(visual.shape[0]) + 48
        hidden = int(self.bundle.model["text"]["hidden_size"])
        for e in experts:
            t0 = time.perf_counter()
            dec = self.decoder(e)
            state = dec.new_state(n + 1)
            state.extra_inputs = self.family.decoder_inputs([], [])  # a text-only request's, where a graph takes any
            dec.step(np.zeros((1, n, hidden), dtype=dec.dtype), state)
            dec.step(np.zeros((1, 1, hidden), dtype=dec.dtype), state)
            took[f"decoder_expert{e}"] = (time.perf_counter() - t0) * 1e3
        return took

    # -- pieces ------------------------------------------------------------------------------------

    @property
    def num_experts(self) -> int:
        return len(self.bundle.graph("decoder")["experts"])

    def decoder(self, expert: int) -> DecoderBackend:
        """The expert's decoder on this pipeline's backend, loaded on first use (a mission may need only one)."""
        dec = self._decoders.get(expert)
        if dec is None:
            with self._load_lock:
                dec = self._decoders.get(expert)
                if dec is None:
                    rel = self.bundle.graph("decoder")["experts"][str(expert)]["file"]
                    spec = DecoderSpec(
                        self.layers,
                        self.kv_heads,
                        self.head_dim,
                        shared_kv=self.bundle.shared_kv,
                    )
                    path = self.bundle.path(rel) if self.engines is None else self.engines.engine(rel)
                    extra = {}
                    twin = self.bundle.graph("decoder")["experts"][str(expert)].get("prefill_file")
                    if twin is not None and self.session_cfg.device == "cpu" and self.engines is None:
                        extra["prefill"] = self.bundle.path(twin)  # INT8 GEMMs for the prompt, on a CPU
                    dec = self.backend(path, spec, self.session_cfg, cache_key=self._sha(rel), **extra)
                    self._decoders[expert] = dec
        return dec

    def vision(self):
        """The vision graph's session on this pipeline's device, created on first use."""
        if self._vision is None:
            with self._vision_lock:
                if self._vision is None:
                    rel = self.bundle.graph("vision")["file"]
                    if self.engines is not None:
                        self._vision = self.engines.vision_session(rel)
                    else:
                        path, content = self.bundle.path(rel), self._cached_content("vision")
                        self._vision = make_session(path, self.session_cfg, cache_key=self._sha(rel), content=content)
        return self._vision

    def run_graph(self, key: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Any graph ``graphs.<key>`` of the manifest (a family's projector, change module...) on ``feeds``,
        each cast to its input's dtype; its session is created on first use, on this pipeline's device
        (onnxruntime: TensorRT engines run the vision graph and the decoders only)."""
        if key not in self.bundle.manifest["graphs"] or key == "decoder":
            raise BundleError(f"{self.bundle.root}: the manifest has no graph {key!r} to run")
        if key == "vision":
            sess = self.vision()
        else:
            sess = self._graphs.get(key)
            if sess is None:
                with self._vision_lock:
                    sess = self._graphs.get(key)
                    if sess is None:
                        rel, content = self.bundle.graph(key)["file"], self._cached_content(key)
                        path = self.bundle.path(rel)
                        sess = make_session(path, self.session_cfg, cache_key=self._sha(rel), content=content)
                        self._graphs[key] = sess
        types = {i.name: ORT_DTYPES[i.type] for i in sess.get_inputs()}
        return sess.run(None, {k: v.astype(types[k], copy=False) for k, v in feeds.items()})

    def _cached_content(self, key: str) -> str | None:
        """The content digest that lets graph ``key`` come from the optimized-graph cache, or None. Only static
        Q/DQ graphs use it: onnxruntime's QDQ fusions are half of such a session's creation (the full-size INT8
        vision tower), while a decoder's is mostly weight prepacking, which the cache would not save and whose
        weights it would copy."""
        graph = self.bundle.graph(key)
        return self.bundle.graph_digest(graph["file"]) if graph.get("quantized") == "int8-qdq" else None

    def _sha(self, rel: str) -> str:
        """A graph file's sha256 prefix from the manifest: the key of its TensorRT engine cache."""
        return str(self.bundle.manifest["files"].get(rel, {}).get("sha256", ""))[:16]

    def choose_expert(self, prompt: str, expert: int | None = None) -> int:
        if expert is not None:
            if not 0 <= expert < self.num_experts:
                raise OptionError(f"expert must be between 0 and {self.num_experts - 1}, got {expert}")
            self.family.task(prompt)
            return expert
        return self.family.route(prompt)

    def pixel_values(self, image: Image.Image) -> np.ndarray:
        return self.family.pixel_values(image)

    def run_vision(self, pixels: np.ndarray) -> np.ndarray:
        """The vision graph on ``pixels`` [views, 3, S, S] -> its features."""
        sess = self.vision()
        inp = sess.get_inputs()[0]
        return sess.run(None, {inp.name: pixels.astype(ORT_DTYPES[inp.type], copy=False)})[0]

    def image_tokens(self, image: Image.Image) -> np.ndarray:
        """Visual tokens of one image, [N, H], exactly as the reference splices them."""
        return self.family.images_to_tokens([image], self.run_vision, self.run_graph)[0]

    def embed_rows(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Embedding rows [len(ids), H] of token ids."""
        rows = self.embed_tokens[ids]
        if self.embed_scales is not None:
            rows = rows.astype(np.float32) * self.embed_scales[ids][:, None]
        return rows

    def embed(self, ids: list[int], images: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
        """[1, S, H] input embeddings: text rows, each image's visual tokens at its sentinel."""
        return self.family.splice(ids, images, self.embed_rows, dtype)

    # -- the whole request ---------------------------------------------------------------------------

    def generate(
        self,
        images: Sequence[ImageInput],
        prompt: str,
        max_new_tokens: int = 256,
        sampling: Sampling | None = None,
        expert: int | None = None,
        on_token: Callable[[str], None] | None = None,
        keep_logits: bool = False,
        ignore_eos: bool = False,
        cancel: threading.Event | None = None,
        think: ThinkOptions | None = None,
    ) -> Answer:
        """Answer ``prompt`` about ``images``: one, or a before/after pair for [CCD] and a change [SEG].

        ``ignore_eos`` decodes the whole budget (benchmarks, parity runs); ``keep_logits`` keeps each
        step's last-position logits on the answer (forced tokens have none). ``cancel``, once set (a service's
        client went away or its deadline passed), stops the request before its next decode step: the answer so far
        is returned with ``stopped_by="cancelled"``. ``think`` bounds or skips a reasoning model's think block
        (rsedge.runtime.think): forced tokens are part of the answer's tokens and count against max_new_tokens.
        """
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise OptionError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}, got {max_new_tokens}")
        if not prompt.strip():
            raise PromptError("the prompt is empty")
        self.family.check_request(prompt, len(images))  # before any image is read
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        tag = self.family.task(prompt)
        chosen = self.choose_expert(prompt, expert)
        pil = [validate_image(im) if isinstance(im, Image.Image) else load_image(im) for im in images]
        ids = self.family.prompt_ids(prompt, len(pil))
        t1 = time.perf_counter()
        # A first request creates the expert's decoder session (graph optimization, weight prepacking: mostly
        # one core) while the vision graph loads and runs, instead of after it.
        if chosen not in self._decoders and pil:
            with ThreadPoolExecutor(1) as pool:
                loading = pool.submit(self.decoder, chosen)
                visual = self.family.images_to_tokens(pil, self.run_vision, self.run_graph)
                t2 = time.perf_counter()
                dec = loading.result()
        else:
            visual = self.family.images_to_tokens(pil, self.run_vision, self.run_graph)
            t2 = time.perf_counter()
            dec = self.decoder(chosen)
        embeds = self.embed(ids, visual, dec.dtype)
        limit = self.bundle.graph("decoder").get("max_positions")
        if limit is not None and embeds.shape[1] + max_new_tokens > limit:
            raise OptionError(
                f"prompt ({embeds.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceed this bundle's "
                f"{limit} positions"
            )
        state = dec.new_state(embeds.shape[1] + max_new_tokens)
        state.extra_inputs = self.family.decoder_inputs(ids, pil)  # e.g. rotary positions apart from the slots
        sampler = Sampler(sampling or Sampling())
        stream = DecodeStream(skip_special_tokens=True)
        streamed: list[str] = []
        tokens: list[int] = []
        seen: list[np.ndarray] = []

        def emit(tok: int) -> None:
            if on_token is not None:
                piece = stream.step(self.tokenizer, tok)
                if piece:
                    streamed.append(piece)
                    on_token(piece)

        markers = ThinkMarkers.from_manifest(self.bundle.manifest)
        prompt_open = decoded_tail_open(self.tokenizer, ids, markers)  # the template opened a think block
        monitor = (
            monitor_for(self.tokenizer, think, markers, prompt_open) if think is not None and think.active else None
        )
        logits = self.prefill(dec, embeds, state)
        t3 = time.perf_counter()
        stopped_by = "max_new_tokens"
        forced = monitor.start()[:max_new_tokens] if monitor is not None else []
        if forced:  # think off: the empty block is the answer's first tokens, through the decoder
            tokens.extend(forced)
            for f in forced:
                emit(f)
            logits = dec.step(self.embed_rows(forced)[None].astype(dec.dtype, copy=False), state)
        while len(tokens) < max_new_tokens:
            if cancel is not None and cancel.is_set():
                stopped_by = "cancelled"
                break
            if keep_logits:
                seen.append(logits.copy())
            tok = sampler(logits)
            tokens.append(tok)
            if tok in self.stop_ids and not ignore_eos:
                stopped_by = "eos"
                break
            emit(tok)
            if len(tokens) >= max_new_tokens:
                break
            feed = [tok]
            if monitor is not None:  # the budget's close marker goes in with the token that spent it
                forced = monitor.feed(tok)[: max_new_tokens - len(tokens)]
                tokens.extend(forced)
                for f in forced:
                    emit(f)
                feed += forced
                if len(tokens) >= max_new_tokens:
                    break
            logits = dec.step(self.embed_rows(feed)[None].astype(dec.dtype, copy=False), state)
        t4 = time.perf_counter()
        answer_text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if on_token is not None:
            tail = stream_tail("".join(streamed), answer_text)
            if tail:
                on_token(tail)
        timings.update(
            preprocess=(t1 - t0) * 1e3,
            vision=(t2 - t1) * 1e3,
            prefill=(t3 - t2) * 1e3,
            decode=(t4 - t3) * 1e3,
            total=(t4 - t0) * 1e3,
        )
        decode_steps = max(len(tokens) - 1, 0)
        if decode_steps:
            timings["decode_per_token"] = (t4 - t3) * 1e3 / decode_steps
        ans = Answer(
            text=answer_text,
            tokens=tokens,
            tag=tag,
            expert=chosen,
            image_sizes=[im.size for im in pil],
            prompt_tokens=int(embeds.shape[1]),
            stopped_by=stopped_by,
            timings=timings,
            step_logits=seen if keep_logits else None,
        )
        parsed = parse_reasoning(answer_text, prompt_open=prompt_open)
        if parsed.tagged or monitor is not None:
            ans.reasoned = parsed
        if monitor is not None:
            ans.think = monitor.report()
        self.family.parse(ans, pil)
        return ans

    def prefill(self, dec: DecoderBackend, embeds: np.ndarray, state: Any) -> np.ndarray:
        """The prompt through ``dec``: one call, or calls of PREFILL_CHUNK tokens where the graph's attention
        holds a whole call's scores. Returns the last position's logits."""
        n = int(embeds.shape[1])
        # plain-MatMul attention (the portable and scatter-shared forms) holds one call's S x T scores
        holds_scores = self.bundle.graph("decoder").get("attention", "standard") in ("standard", "scatter-shared")
        chunk = PREFILL_CHUNK if holds_scores and n > PREFILL_CHUNK else n
        logits = None
        for start in range(0, n, chunk):
            logits = dec.step(embeds[:, start : start + chunk], state)
        return logits
