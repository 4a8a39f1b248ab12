"""The HTTP routes: OpenAI chat completions, the structured RS answer, health, models, metrics and the console.

Handlers parse and check everything a request carries (model, task, image count, images) before it is
queued, so a bad request costs no worker and gets one 4xx line; the answer itself runs on a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rsedge.errors import BundleError, OptionError, RsedgeError
from rsedge.geo.tiling import SceneAnswer, answer_scene
from rsedge.runtime.pipeline import Answer
from rsedge.runtime.router import check_image_count, task_tag
from rsedge.serve import ask as asks
from rsedge.serve import chat, scenes
from rsedge.serve.ask import Ask
from rsedge.serve.config import ServeConfig
from rsedge.serve.guard import BodyTooLarge, Guard
from rsedge.serve.inputs import image_from_source, source_from_url
from rsedge.serve.logs import log
from rsedge.serve.metrics import ServeMetrics
from rsedge.serve.models import ModelSet, UnknownModel
from rsedge.serve.workers import Dropped, QueueFull, WorkerPool

TASKS = {"vg": "[VG]", "seg": "[SEG]", "cap": "[CAP]", "cls": "[CLS]", "vqa": "[VQA]", "ccd": "[CCD]", "ref": "[REF]"}
_DONE = object()


class DeadlineExceeded(RsedgeError):
    """A request did not finish within the service's deadline (HTTP 504)."""


def _status(e: RsedgeError) -> int:
    if isinstance(e, UnknownModel):
        return 404
    if isinstance(e, BodyTooLarge):
        return 413
    if isinstance(e, DeadlineExceeded):
        return 504
    if isinstance(e, scenes.GeoUnavailable):  # the request is fine; this service lacks what reads it
        return 501
    if isinstance(e, BundleError):  # a damaged graph or weight file: the service's fault, not the request's
        return 500
    return 400


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class Runner:
    """Puts an Ask on the worker pool and records what it cost."""

    def __init__(self, cfg: ServeConfig, pool: WorkerPool, metrics: ServeMetrics) -> None:
        self.cfg, self.pool, self.metrics = cfg, pool, metrics

    def start(
        self, ask: Ask, arrival: float, on_token: Callable[[str], None] | None = None
    ) -> tuple[Future[Answer | SceneAnswer], threading.Event, float]:
        cancel, deadline = threading.Event(), arrival + self.cfg.deadline_s
        model = ask.model

        def job() -> Answer | SceneAnswer:
            self.metrics.queue_wait.observe(time.monotonic() - arrival)
            expert = model.expert_for(ask.prompt)
            model.ensure_expert(expert)
            self.metrics.resident.labels(model.name, f"expert{expert}").set(model.resident.get(f"expert{expert}") or 0)
            if ask.scene is not None:
                return self._scene(ask, cancel, arrival, on_token)
            ans = model.pipe.generate(
                ask.images,
                ask.prompt,
                max_new_tokens=ask.max_new_tokens,
                sampling=ask.sampling,
                on_token=on_token,
                cancel=cancel,
                ignore_eos=ask.ignore_eos,
                think=ask.think,
            )
            self._record(ask, ans, arrival)
            return ans

        return self.pool.submit(job, cancel, deadline), cancel, deadline

    def _scene(
        self, ask: Ask, cancel: threading.Event, arrival: float, on_token: Callable[[str], None] | None = None
    ) -> SceneAnswer:
        """A scene's tiles, one generate call each; ``cancel`` (client gone, deadline) stops it between tiles.
        ``on_token`` gets the answer's text in one piece: a scene's text (each tile's line) exists once all are done."""
        job, name = ask.scene, ask.model.name
        task = task_tag(ask.prompt) or "none"
        answer = answer_scene(
            ask.model.pipe,
            job.scene,
            ask.prompt,
            tile=job.tile,
            overlap=job.overlap,
            iou=job.iou,
            max_new_tokens=ask.max_new_tokens,
            sampling=ask.sampling,
            cancel=cancel,
        )
        self.metrics.tiles.labels(name, task, "answered").inc(len(answer.tiles))
        self.metrics.tiles.labels(name, task, "nodata").inc(answer.skipped_tiles)
        labels = (name, answer.tag or "none", str(answer.expert))
        self.metrics.latency.labels(*labels).observe(time.monotonic() - arrival)
        self.metrics.tokens.labels(*labels).inc(sum(t.tokens for t in answer.tiles))
        for t in answer.tiles:
            self.metrics.answers.labels(t.stopped_by).inc()
        if on_token is not None and answer.text:
            on_token(answer.text)
        return answer

    def admit(self) -> None:
        try:
            self.pool.admit()
        except QueueFull:
            self.metrics.rejected.labels("queue_full").inc()
            raise

    def _record(self, ask: Ask, ans: Answer, arrival: float) -> None:
        labels = (ask.model.name, ans.tag or "none", str(ans.expert))
        self.metrics.latency.labels(*labels).observe(time.monotonic() - arrival)
        self.metrics.tokens.labels(*labels).inc(len(ans.tokens))
        self.metrics.answers.labels(ans.stopped_by).inc()
        per_token = ans.timings.get("decode_per_token")
        if per_token:
            self.metrics.tokens_per_s.labels(*labels).observe(1e3 / per_token)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is read by then; later receives wait for the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(models: ModelSet, cfg: ServeConfig) -> FastAPI:
    pool = WorkerPool(cfg.workers, cfg.queue_size)
    metrics = ServeMetrics(pool)
    runner = Runner(cfg, pool, metrics)
    started = int(time.time())
    for m in models.by_name.values():
        for part, grew in m.resident.items():
            metrics.resident.labels(m.name, part).set(grew or 0)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(pool.shutdown)  # uvicorn has let in-flight requests finish; wait for their workers

    app = FastAPI(title="rsedge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool, app.state.models, app.state.metrics = pool, models, metrics
    app.add_middleware(Guard, cfg=cfg, metrics=metrics)

    @app.exception_handler(RsedgeError)
    async def rsedge_error(request: Request, e: RsedgeError) -> JSONResponse:
        return _error(_status(e), str(e))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        rid = request.state.request_id
        log(logging.ERROR, "unexpected error", request_id=rid, error=f"{type(e).__name__}: {e}", exc_info=True)
        return _error(500, f"internal error ({type(e).__name__}); see the service log, request id {rid}")

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull) -> JSONResponse:
        return _error(429, f"the service is busy: {e}", {"Retry-After": str(e.retry_after_s)})

    @app.exception_handler(Dropped)
    async def dropped(request: Request, e: Dropped) -> JSONResponse:
        return _error(504, f"the request's deadline of {cfg.deadline_s:g} s passed before a worker took it")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "models": {
                m.name: {"resident_bytes": dict(m.resident), "experts": m.pipe.num_experts}
                for m in models.by_name.values()
            },
            "running": pool.running,
            "waiting": pool.waiting,
            "queue_size": cfg.queue_size,
            "workers": cfg.workers,
        }

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        data = [{"id": name, "object": "model", "created": started, "owned_by": "rsedge"} for name in models.by_name]
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def console() -> HTMLResponse:
        return HTMLResponse(files("rsedge").joinpath("data/console/index.html").read_text())

    async def body_json(request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise OptionError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise OptionError("the request body must be a JSON object")
        return body

    def make_ask(model_name: Any, prompt: str, urls: list[str], body: dict[str, Any], uploads=()) -> Ask:
        if model_name is not None and not isinstance(model_name, str):
            raise OptionError("model must be a string")
        model = models.get(model_name)
        if not prompt.strip():
            raise OptionError("the question is empty")
        check_image_count(prompt, len(urls) + len(uploads))  # before any image is decoded
        limit = body.get("max_completion_tokens", body.get("max_tokens", body.get("max_new_tokens")))
        n_tokens = asks.max_tokens(limit, cfg.max_new_tokens)
        sampling = asks.sampling(body)
        think = asks.think_options(body)
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise OptionError(f"ignore_eos must be true or false, got {ignore_eos!r}")
        # rsedge's own field: the mask as rle text, png, both, or (a scene's) a georeferenced geotiff
        mask_format = scenes.mask_formats(body.get("mask", body.get("mask_format", "rle")))
        fields = scenes.scene_fields(body)
        # images last: every cheaper check has passed before one is decoded
        sources = [(f"image {i + 1}", source_from_url(u, f"image {i + 1}", cfg.image_root)) for i, u in enumerate(urls)]
        sources += list(uploads)
        if any(scenes.is_scene(source, where, fields) for where, source in sources):
            if len(sources) != 1:
                raise OptionError(f"a GeoTIFF scene is answered on its own; send one scene, got {len(sources)} images")
            where, source = sources[0]
            size = model.pipe.family.tile_size()
            job = scenes.read_job(source, where, fields, mask_format, prompt, cfg.max_pixels, size)
            if think is not None:
                raise OptionError("max_think_tokens / think are not supported for scenes (tiled answers) yet")
            return Ask(model, [], prompt, n_tokens, sampling, ignore_eos, mask_format, job, fields.preview)
        if "geotiff" in mask_format:
            raise OptionError("mask geotiff needs a georeferenced scene (a GeoTIFF); this image is not one")
        if fields.want_geojson:
            raise OptionError("want_geojson needs a georeferenced scene (a GeoTIFF); this image is not one")
        images = [image_from_source(source, where, cfg.max_pixels) for where, source in sources]
        return Ask(model, images, prompt, n_tokens, sampling, ignore_eos, mask_format, None, fields.preview, think)

    async def answer(request: Request, ask: Ask) -> Answer | SceneAnswer | None:
        """Run ``ask`` to its end; a client that leaves cancels it (None: nobody is left to answer), and so does
        the deadline."""
        arrival = request.state.arrival
        fut, cancel, deadline = runner.start(ask, arrival)
        request.state.submitted = True
        done_fut = asyncio.wrap_future(fut)
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            done, _ = await asyncio.wait(
                {done_fut, gone}, timeout=max(deadline - time.monotonic(), 0), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            gone.cancel()
        if done_fut not in done:
            cancel.set()
            if gone in done:
                request.state.log["cancelled"] = "client disconnected"
                return None
            raise DeadlineExceeded(f"the request did not finish within the service's deadline of {cfg.deadline_s:g} s")
        return done_fut.result()

    def note(request: Request, ask: Ask, ans: Answer | SceneAnswer | None = None) -> None:
        request.state.log.update(model=ask.model.name, task=ask.task)
        if isinstance(ans, SceneAnswer):
            tokens = sum(t.tokens for t in ans.tiles)
            request.state.log.update(expert=ans.expert, tiles=len(ans.tiles), tokens=tokens, stopped_by=ans.stopped_by)
        elif ans is not None:
            request.state.log.update(expert=ans.expert, tokens=len(ans.tokens), stopped_by=ans.stopped_by)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        request.state.arrival, request.state.submitted = time.monotonic(), False
        runner.admit()  # 429 before the body is read
        try:
            return await _chat_completions(request)
        except BaseException:
            if not request.state.submitted:  # a place taken for a request that will not run
                pool.release()
            raise

    async def _chat_completions(request: Request) -> Response:
        body = await body_json(request)
        prompt, urls = chat.user_turn(body)
        if body.get("n", 1) != 1:
            raise OptionError("n must be 1")
        ask = await asyncio.to_thread(make_ask, body.get("model"), prompt, urls, body)
        note(request, ask)
        name, rid = ask.model.name, request.state.request_id
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return stream_chat(request, ask, name, rid, include_usage)
        ans = await answer(request, ask)
        if ans is None:
            return Response(status_code=499)  # nginx's "client closed request": for the log, nobody reads it
        note(request, ask, ans)
        extra = await asyncio.to_thread(asks.result_json, ask, ans)  # a scene's GeoJSON and PNGs take a while
        return JSONResponse(chat.completion(rid, name, ans, asks.result_usage(ask, ans), extra))

    def stream_chat(request: Request, ask: Ask, name: str, rid: str, include_usage: bool) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()

        def on_token(piece: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        fut, cancel, deadline = runner.start(ask, request.state.arrival, on_token)
        request.state.submitted = True
        fut.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, _DONE))

        def sse(obj: dict[str, Any] | str) -> str:
            return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"

        async def events() -> AsyncIterator[str]:
            gone = asyncio.ensure_future(_client_gone(request))
            gone.add_done_callback(lambda t: t.cancelled() or cancel.set())
            try:
                yield sse(chat.chunk(rid, name, {"role": "assistant", "content": ""}))
                while True:
                    try:
                        item = await asyncio.wait_for(pieces.get(), timeout=max(deadline - time.monotonic(), 0.001))
                    except asyncio.TimeoutError:
                        cancel.set()
                        msg = f"the request did not finish within the service's deadline of {cfg.deadline_s:g} s"
                        yield sse({"error": {"message": msg, "type": "server_error", "code": 504}})
                        return
                    if item is _DONE:
                        break
                    yield sse(chat.chunk(rid, name, {"content": item}))
                try:
                    ans = fut.result()
                except (RsedgeError, Dropped) as e:
                    yield sse({"error": {"message": str(e), "type": "invalid_request_error", "code": 400}})
                    return
                note(request, ask, ans)
                extra = {"rsedge": await asyncio.to_thread(asks.result_json, ask, ans)}
                yield sse(chat.chunk(rid, name, {}, asks.finish_reason(ans), **extra))
                if include_usage:
                    usage_chunk = chat.chunk(rid, name, {}, usage=asks.result_usage(ask, ans))
                    usage_chunk["choices"] = []
                    yield sse(usage_chunk)
                yield sse("[DONE]")
            finally:
                gone.cancel()
                if not fut.done():
                    cancel.set()  # the client left mid-stream: stop decoding for nobody
                    request.state.log["cancelled"] = "client disconnected"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/rs/answer")
    async def rs_answer(request: Request) -> Response:
        """The task as a field: JSON {task, question, images: [data URIs]} or a multipart form with image files."""
        request.state.arrival, request.state.submitted = time.monotonic(), False
        runner.admit()
        try:
            return await _rs_answer(request)
        except BaseException:
            if not request.state.submitted:  # a place taken for a request that will not run
                pool.release()
            raise

    async def _rs_answer(request: Request) -> Response:
        uploads: list[tuple[str, bytes]] = []
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=4, max_fields=32)
            body = {k: v for k, v in form.items() if isinstance(v, str)}
            for i, f in enumerate(form.getlist("image")):
                if isinstance(f, str):
                    raise OptionError("the image field must be a file upload")
                uploads.append((f.filename or f"image {i + 1}", await f.read()))
            for key in ("max_new_tokens", "seed", "max_think_tokens"):
                if key in body:
                    body[key] = _int_field(key, body[key])
            if "think" in body:  # a form's true / false
                body["think"] = {"true": True, "false": False}.get(body["think"].lower(), body["think"])
            for key in ("temperature", "top_p"):
                if key in body:
                    body[key] = _float_field(key, body[key])
            urls: list[str] = []
        else:
            body = await body_json(request)
            urls = body.get("images") or []
            if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
                raise OptionError("images must be a list of data URIs")
        task = str(body.get("task", "")).strip("[] ").lower()
        if task not in TASKS:
            raise OptionError(f"unknown task {body.get('task')!r}; one of: {', '.join(TASKS)}")
        question = body.get("question", "")
        if not isinstance(question, str):
            raise OptionError("question must be a string")
        prompt = f"{TASKS[task]} {question}".strip()
        ask = await asyncio.to_thread(make_ask, body.get("model"), prompt, urls, body, uploads)
        note(request, ask)
        ans = await answer(request, ask)
        if ans is None:
            return Response(status_code=499)
        note(request, ask, ans)
        out = {"model": ask.model.name, "task": TASKS[task], "prompt": prompt, "usage": asks.result_usage(ask, ans)}
        out.update(await asyncio.to_thread(asks.result_json, ask, ans))
        return JSONResponse(out)

    return app


def _int_field(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise OptionError(f"{key} must be an integer, got {value!r}") from None


def _float_field(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise OptionError(f"{key} must be a number, got {value!r}") from None
