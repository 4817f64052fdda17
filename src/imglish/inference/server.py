"""``imglish serve``: the pipelines behind an HTTP API (FastAPI), with dynamic batching across requests.

    from imglish.inference.server import ServeConfig, create_app, load_pipelines
    app = create_app(load_pipelines(["runs/vqa/model.safetensors", "runs/retrieval/model.safetensors"]))
    # uvicorn.run(app, host="127.0.0.1", port=8000)

How a request is answered:

1. **Limits first.** A body larger than ``max_upload_bytes`` is refused with 413 before it is parsed (from
   ``Content-Length``, or while it streams in); an image whose header says it has more than ``max_pixels`` pixels is
   refused with 413 before it is decoded (decompression bombs); a text longer than ``max_text_chars`` with 422.
2. **Preprocess in the handler** (in a worker thread, so the event loop keeps serving): the upload is decoded and
   transformed, the text tokenized, the parameters checked, exactly as the Python pipeline does. Anything wrong with
   the input is a 4xx here, before it can take a place in the queue.
3. **The batcher.** One inference thread owns every model. It takes the oldest waiting request and, while other
   requests are still being read and preprocessed by handlers, waits at most ``max_wait_ms`` from that request's
   arrival for more requests that can share its forward (same pipeline, same forward parameters, same tensors: a
   caption with 5 beams does not go with one with 3), up to ``max_batch``; then it runs them as one batch and the
   postprocessing of each. A lone request (nothing else arriving) does not wait. When ``max_queue`` requests are already waiting a new
   one gets 503 at once; a request not answered within ``timeout_s`` gets 503 and its place is dropped.
4. **Answers** are the pipeline's shapes as JSON. Every error is JSON ``{"error": "...", "status": N}`` naming the
   problem; bad input is never a 500, and a failing batch answers its own requests with 500 and the server goes on.

The batch sizes are logged (logger ``imglish.serve``, one line per batch) and counted in ``GET /health``.
"""


import asyncio
import collections
import concurrent.futures
import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from imglish.inference.inputs import ImageTooLarge, InputError, to_image

__all__ = ["ENDPOINTS", "Batcher", "QueueFull", "ServeConfig", "create_app", "load_pipelines", "serve"]

log = logging.getLogger("imglish.serve")

#: endpoint path -> the pipeline that answers it
ENDPOINTS = {
    "/v1/classify": "classify",
    "/v1/vqa": "vqa",
    "/v1/caption": "caption",
    "/v1/nlvr2": "nlvr2",
    "/v1/zeroshot": "zeroshot",
    "/v1/embed/image": "embed",
    "/v1/embed/text": "embed",
}
#: checkpoint task -> the pipelines it serves
TASK_PIPELINES = {
    "imageclassification": ("classify",),
    "vqav2": ("vqa",),
    "captioning": ("caption",),
    "nlvr2": ("nlvr2",),
    "retrieval": ("zeroshot", "embed"),
    "backbone": ("embed",),
    "pretraining": ("embed",),
}
#: pipeline -> the model task and the command that makes such a checkpoint (for "not loaded" answers)
_MADE_BY = {
    "classify": ("imageclassification", "imglish finetune imagenet"),
    "vqa": ("vqav2", "imglish finetune vqav2"),
    "caption": ("captioning", "imglish finetune coco_captioning"),
    "nlvr2": ("nlvr2", "imglish finetune nlvr2"),
    "zeroshot": ("retrieval", "imglish finetune coco_retrieval"),
    "embed": ("retrieval", "imglish finetune coco_retrieval, or a pretraining checkpoint"),
}


@dataclasses.dataclass
class ServeConfig:
    """The server's limits and batching.

    Attributes:
        max_batch: requests per forward at most.
        max_wait_ms: how long the oldest waiting request may wait for others to join its batch.
        max_queue: requests waiting for the model at most; more get 503 at once.
        timeout_s: a request not answered within this many seconds gets 503.
        max_upload_bytes: a request body larger than this gets 413 (before it is parsed).
        max_pixels: an image with more pixels than this gets 413 (before it is decoded).
        max_text_chars: a question or text longer than this gets 422 (before it is tokenized).
    """

    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    timeout_s: float = 30.0
    max_upload_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_text_chars: int = 2000

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_upload_bytes", "max_pixels", "max_text_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServeConfig.{name} must be a positive integer, got {value!r}")
        for name in ("max_wait_ms", "timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or math.isnan(value):
                raise ValueError(f"ServeConfig.{name} must be a non-negative number, got {value!r}")
        if self.timeout_s == 0:
            raise ValueError("ServeConfig.timeout_s must be positive")


# ============================================================================================= the batcher
class QueueFull(RuntimeError):
    """More than ``max_queue`` requests are waiting."""


@dataclasses.dataclass(eq=False)
class _Job:
    pipe: Any
    tensors: dict[str, Any]
    fwd: dict[str, Any]
    post: dict[str, Any]
    key: tuple
    arrived: float
    future: concurrent.futures.Future
    dropped: bool = False


class Batcher:
    """One inference thread that batches waiting requests (see the module docstring).

    ``submit(pipe, tensors, fwd, post)`` returns a :class:`concurrent.futures.Future` of the postprocessed answer;
    it raises :class:`QueueFull` when ``max_queue`` requests are waiting.
    """

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Job] = collections.deque()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.expired = 0
        self._incoming = 0  # requests announced by handlers (being read and preprocessed), not yet submitted

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        if self._thread is None:
            self._closed = False
            self._thread = threading.Thread(target=self._loop, name="imglish-inference", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._cond:  # whatever is still waiting is answered, not left hanging
            while self._waiting:
                _settle(self._waiting.popleft().future, error=RuntimeError("the server is shutting down"))

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------ requests
    def announce(self) -> None:
        """A handler has started reading a request that will probably be submitted: while any are announced, the
        oldest waiting request waits (up to ``max_wait_ms``) for company; with none it runs at once."""
        with self._cond:
            self._incoming += 1

    def withdraw(self) -> None:
        """An announced request will not be submitted after all (bad input)."""
        with self._cond:
            self._incoming = max(0, self._incoming - 1)
            self._cond.notify_all()

    def submit(self, pipe: Any, tensors: dict[str, Any], fwd: dict[str, Any], post: dict[str, Any],
               announced: bool = False) -> concurrent.futures.Future:
        key = (id(pipe), tuple(sorted((k, tuple(v.shape)) for k, v in tensors.items())),
               tuple(sorted(fwd.items())))
        job = _Job(pipe, tensors, fwd, post, key, time.monotonic(), concurrent.futures.Future())
        with self._cond:
            if announced:
                self._incoming = max(0, self._incoming - 1)
                self._cond.notify_all()
            if self._closed or self._thread is None:
                raise RuntimeError("the inference thread is not running")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting for the model (max_queue "
                                f"{self.config.max_queue}); retry later")
            self._waiting.append(job)
            self._cond.notify_all()
        return job.future

    def drop(self, future: concurrent.futures.Future) -> None:
        """Give up a request (its client timed out): it is skipped if it has not run yet."""
        with self._cond:
            for job in self._waiting:
                if job.future is future:
                    job.dropped = True

    # ------------------------------------------------------------------ the thread
    def _take(self) -> list[_Job] | None:
        cfg = self.config
        with self._cond:
            while True:
                while self._waiting and (self._waiting[0].dropped or self._waiting[0].future.cancelled()):
                    self._waiting.popleft()
                    self.expired += 1
                if self._waiting:
                    break
                if self._closed:
                    return None
                self._cond.wait()
            first = self._waiting[0]
            deadline = first.arrived + cfg.max_wait_ms / 1000
            while not self._closed:
                same = sum(1 for j in self._waiting if j.key == first.key and not j.dropped)
                left = deadline - time.monotonic()
                if same >= cfg.max_batch or left <= 0 or self._incoming == 0:
                    break
                self._cond.wait(left)
            batch, rest = [], collections.deque()
            for job in self._waiting:
                if job.dropped or job.future.cancelled():
                    self.expired += 1
                elif job.key == first.key and len(batch) < cfg.max_batch:
                    batch.append(job)
                else:
                    rest.append(job)
            self._waiting = rest
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            # a client that gave up cancelled its future: its place is skipped, not computed
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            self.expired += len(batch) - len(live)
            if not live:
                continue
            try:
                self._run(live)
            except Exception:
                log.exception("unexpected error in the inference thread")
                for job in live:
                    _settle(job.future, error=RuntimeError("internal error in the inference thread"))

    def _run(self, batch: list[_Job]) -> None:
        pipe = batch[0].pipe
        started = time.monotonic()
        waited = (started - batch[0].arrived) * 1000
        try:
            raws = pipe.forward(pipe.collate([j.tensors for j in batch]), **batch[0].fwd)
        except Exception as err:
            log.exception("batch of %d %s requests failed", len(batch), pipe.task)
            for job in batch:
                _settle(job.future, error=err)
            return
        for job, raw in zip(batch, raws):
            try:
                answer = pipe.postprocess(raw, **job.post)
            except Exception as err:  # noqa: BLE001 - answered as that request's error
                _settle(job.future, error=err)
            else:
                _settle(job.future, answer)
        self.batches += 1
        self.batch_sizes[len(batch)] += 1
        log.info("batch task=%s size=%d waited_ms=%.1f forward_ms=%.1f queue=%d", pipe.task, len(batch), waited,
                 (time.monotonic() - started) * 1000, len(self._waiting))


def _settle(future: concurrent.futures.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Answer a future unless it is already settled (a client that timed out cancelled it)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


# ============================================================================================= loading
def load_pipelines(
    checkpoints: Sequence[str | Path],
    *,
    model: str | None = None,
    tokenizer: Any = None,
    device: str | None = None,
    precision: str = "fp32",
    max_pixels: int | None = ServeConfig.max_pixels,
) -> dict[str, Any]:
    """Pipelines for every task the checkpoints serve (a retrieval checkpoint serves ``zeroshot`` and ``embed``
    with one model).

    Raises:
        FileNotFoundError: a checkpoint does not exist; ValueError: two checkpoints for the same pipeline, ``model``
        with several checkpoints, or a checkpoint that cannot be read.
    """
    import imglish
    from imglish.inference.pipeline import PIPELINES, Pipeline
    from imglish.model.loading import read_checkpoint_metadata

    if not checkpoints:
        raise ValueError("serve needs at least one --checkpoint")
    if model is not None and len(checkpoints) > 1:
        raise ValueError("--model names the model of one official checkpoint; give one --checkpoint with it")
    pipes: dict[str, Any] = {}
    for ckpt in map(str, checkpoints):
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"checkpoint {ckpt!r} does not exist")
        if model is not None:
            task = imglish.get_model_info(model).task
        else:
            try:
                meta = read_checkpoint_metadata(ckpt)
            except Exception as err:  # noqa: BLE001 - named in the message
                raise ValueError(f"checkpoint {ckpt!r} cannot be read: {err}") from None
            if meta.get("format") != "imglish/1":
                raise ValueError(f"{ckpt} is not an imglish checkpoint (no imglish metadata): pass the registered "
                                 "model name with --model (e.g. beit3_base_patch16_480_vqav2)")
            task = meta.get("task")
        names = TASK_PIPELINES.get(task)
        if names is None:
            raise ValueError(f"checkpoint {ckpt} holds a {task!r} model, which no endpoint serves; expected one of "
                             f"{', '.join(TASK_PIPELINES)}")
        for name in names:
            if name in pipes:
                raise ValueError(f"two checkpoints serve {name!r}: {pipes[name].checkpoint} and {ckpt}; give one")
        first = PIPELINES[names[0]].from_checkpoint(ckpt, model=model, tokenizer=tokenizer, device=device,
                                                    precision=precision, max_pixels=max_pixels)
        pipes[names[0]] = first
        for name in names[1:]:  # the same model and processor behind another pipeline
            cls: type[Pipeline] = PIPELINES[name]
            pipes[name] = cls(first.model, first.processor, device=first.device, precision=precision,
                              max_pixels=max_pixels, checkpoint=ckpt)
    return pipes


# ============================================================================================= the app
class _BodyTooLarge(Exception):
    pass


class _LimitBody:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before the app parses it."""

    def __init__(self, app: Any, limit: int, stats: Any) -> None:
        self.app, self.limit, self.stats = app, limit, stats

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send, int(length))
        body, more = [], True
        size = 0
        while more:  # read the body here (at most limit + one chunk), then replay it to the app
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._refuse(send, None)
            body.append(chunk)
            more = message.get("more_body", False)
        data = b"".join(body)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send: Any, length: int | None) -> None:
        size = f"{length} bytes" if length is not None else "more than that"
        payload = {"error": f"request body is {size}; at most {self.limit} bytes are accepted (max_upload_bytes)",
                   "status": 413}
        self.stats.count(413)
        body = json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: collections.Counter[str] = collections.Counter()
        self.status: collections.Counter[int] = collections.Counter()

    def count(self, status: int, task: str | None = None) -> None:
        with self.lock:
            self.status[status] += 1
            if task is not None:
                self.requests[task] += 1


def _page() -> str:
    from importlib import resources

    return resources.files("imglish.inference").joinpath("page.html").read_text(encoding="utf-8")


def create_app(pipelines: Mapping[str, Any], config: ServeConfig | None = None) -> Any:
    """The FastAPI app serving ``pipelines`` (pipeline name -> :class:`~imglish.inference.pipeline.Pipeline`).

    The inference thread starts and stops with the app's lifespan (uvicorn, or ``with TestClient(app)``).
    """
    try:
        from fastapi import FastAPI, File, Form, Request, UploadFile
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse
        from starlette.concurrency import run_in_threadpool
        from starlette.exceptions import HTTPException as StarletteHTTPException
    except ImportError as err:
        raise ImportError("imglish serve needs FastAPI and uvicorn: pip install 'imglish[serve]'") from err
    import contextlib

    import imglish

    config = config or ServeConfig()
    pipes = dict(pipelines)
    for name, pipe in pipes.items():
        if name not in _MADE_BY or getattr(pipe, "task", None) != name:
            raise ValueError(f"pipelines[{name!r}] must be a {name!r} pipeline, got {pipe!r}")
        if pipe.max_pixels is None or pipe.max_pixels > config.max_pixels:
            pipe.max_pixels = config.max_pixels
    batcher = Batcher(config)
    stats = _Stats()

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        batcher.start()
        log.info("serving %s (max_batch %d, max_wait_ms %g)", ", ".join(sorted(pipes)) or "nothing",
                 config.max_batch, config.max_wait_ms)
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(
        title="imglish",
        version=imglish.__version__,
        description="BEiT-3 inference: classification, VQA, captioning, NLVR2, zero-shot classification and "
                    "embeddings. Uploads are multipart forms; answers are JSON in the shapes of imglish.pipeline.",
        lifespan=lifespan,
    )
    app.state.batcher, app.state.pipelines, app.state.config, app.state.stats = batcher, pipes, config, stats

    # ------------------------------------------------------------------ errors as JSON
    def error(status: int, message: str, task: str | None = None, headers: dict | None = None) -> Any:
        stats.count(status, task)
        return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Any:
        problems = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query"))
            msg = e.get("msg", "invalid")
            if e.get("type") == "missing":
                msg = "is required" + (" (a multipart form field)" if "body" in e.get("loc", ()) else "")
            problems.append(f"{where or 'request'} {msg}")
        return error(422, f"{request.url.path}: " + "; ".join(problems), ENDPOINTS.get(request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Any:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            detail = f"no such endpoint {request.url.path}; see /docs"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return error(exc.status_code, detail)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Any:
        log.exception("unexpected error answering %s", request.url.path)
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ the common path
    async def read_image(upload: Any, field: str) -> Any:
        data = await upload.read()
        name = f"{field!r} ({upload.filename or 'no filename'})"
        if not data:
            raise InputError(f"image {name} is empty (0 bytes)")
        return await run_in_threadpool(to_image, data, max_pixels=config.max_pixels, name=name)

    def check_text(value: str | None, field: str) -> str:
        if value is None or not value.strip():
            raise InputError(f"{field} is empty; expected a non-empty string")
        if len(value) > config.max_text_chars:
            raise InputError(f"{field} is {len(value)} characters; at most {config.max_text_chars} are accepted "
                             "(max_text_chars)")
        return value

    async def answer(task: str, build: Any, params: dict[str, Any]) -> Any:
        pipe = pipes.get(task)
        if pipe is None:
            model_task, made_by = _MADE_BY[task]
            loaded = ", ".join(sorted(pipes)) or "none"
            return error(404, f"no {task} model is loaded (loaded: {loaded}); start imglish serve with "
                              f"--checkpoint a {model_task} checkpoint (made by {made_by})", task)
        batcher.announce()
        try:
            example = await build()
            checked = pipe.check_params(**{k: v for k, v in params.items() if v is not None})
            fwd, post = pipe.split_params(checked)
            tensors = await run_in_threadpool(pipe.preprocess, example)
        except BaseException as err:
            batcher.withdraw()
            if isinstance(err, ImageTooLarge):
                return error(413, str(err), task)
            if isinstance(err, InputError):
                return error(422, str(err), task)
            raise
        try:
            future = batcher.submit(pipe, tensors, fwd, post, announced=True)
        except QueueFull as err:
            return error(503, str(err), task, {"Retry-After": "1"})
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), timeout=config.timeout_s)
        except asyncio.TimeoutError:
            batcher.drop(future)
            return error(503, f"not answered within {config.timeout_s:g} s (timeout_s; {batcher.waiting} requests "
                              "waiting); retry later", task, {"Retry-After": "1"})
        except Exception as err:  # noqa: BLE001 - the model failed on this batch
            return error(500, f"the model failed on this request: {type(err).__name__}: {err}", task)
        stats.count(200, task)
        if task == "embed":
            kind = "image" if "image" in tensors else "text"
            return {f"{kind}_embeds": [result.tolist()], "dim": int(result.numel())}
        return result

    # ------------------------------------------------------------------ endpoints
    img_doc = "the image file (JPEG, PNG, WebP, ...)"

    @app.post("/v1/classify", summary="Image classification: top-k labels")
    async def classify(image: UploadFile = File(..., description=img_doc),
                       top_k: int = Form(5, description="how many labels")) -> Any:
        """`[{"label", "score"}]`, best first (softmax over the model's classes)."""
        async def build():
            return {"image": await read_image(image, "image")}
        return await answer("classify", build, {"top_k": top_k})

    @app.post("/v1/vqa", summary="Visual question answering")
    async def vqa(image: UploadFile = File(..., description=img_doc),
                  question: str = Form(..., description="the question"),
                  top_k: int = Form(1, description="how many answers")) -> Any:
        """`[{"answer", "score"}]`, best first (sigmoid scores over the answer vocabulary)."""
        async def build():
            q = check_text(question, "question")
            return {"image": await read_image(image, "image"), "question": q}
        return await answer("vqa", build, {"top_k": top_k})

    @app.post("/v1/caption", summary="Image captioning (beam search)")
    async def caption(image: UploadFile = File(..., description=img_doc),
                      num_beams: int = Form(3, description="beam width"),
                      max_length: int | None = Form(None, description="tokens at most, BOS included")) -> Any:
        """`[{"generated_text"}]`."""
        async def build():
            return {"image": await read_image(image, "image")}
        return await answer("caption", build, {"num_beams": num_beams, "max_length": max_length})

    @app.post("/v1/nlvr2", summary="Is the statement true of the two images?")
    async def nlvr2(left: UploadFile = File(..., description="the left image"),
                    right: UploadFile = File(..., description="the right image"),
                    text: str = Form(..., description="the statement")) -> Any:
        """`{"label": "True" | "False", "score"}`."""
        async def build():
            t = check_text(text, "text")
            return {"left": await read_image(left, "left"), "right": await read_image(right, "right"), "text": t}
        return await answer("nlvr2", build, {})

    @app.post("/v1/zeroshot", summary="Zero-shot classification with the dual encoder")
    async def zeroshot(image: UploadFile = File(..., description=img_doc),
                       labels: str = Form(..., description="class names, comma-separated or a JSON list"),
                       top_k: int | None = Form(None, description="how many labels (default all)")) -> Any:
        """`[{"label", "score"}]`, best first (softmax over the labels of the scaled cosine similarities; a class
        embedding is the mean over the bundled prompt templates)."""
        names = _parse_labels(labels)

        async def build():
            return {"image": await read_image(image, "image")}
        return await answer("zeroshot", build, {"labels": names, "top_k": top_k})

    @app.post("/v1/embed/image", summary="Image embedding")
    async def embed_image(image: UploadFile = File(..., description=img_doc)) -> Any:
        """`{"image_embeds": [[float, ...]], "dim"}` (L2-normalised)."""
        async def build():
            return {"image": await read_image(image, "image")}
        return await answer("embed", build, {})

    @app.post("/v1/embed/text", summary="Text embedding")
    async def embed_text(text: str = Form(..., description="the text")) -> Any:
        """`{"text_embeds": [[float, ...]], "dim"}` (L2-normalised)."""
        async def build():
            pipe = pipes.get("embed")
            if pipe is not None and pipe.processor.tokenizer is None:
                raise InputError(f"{pipe.checkpoint} has no text tokenizer beside it; texts cannot be embedded")
            return {"text": check_text(text, "text")}
        return await answer("embed", build, {})

    @app.get("/health", summary="Status, loaded models, counters and batch sizes")
    async def health() -> Any:
        sizes = dict(sorted(batcher.batch_sizes.items()))
        n = sum(sizes.values())
        return {
            "status": "ok",
            "version": imglish.__version__,
            "tasks": {name: {"endpoints": [p for p, t in ENDPOINTS.items() if t == name],
                             "checkpoint": p.checkpoint, "model": getattr(p.model, "model_name", None),
                             "device": str(p.device), "precision": p.precision}
                      for name, p in sorted(pipes.items())},
            "waiting": batcher.waiting,
            "batches": batcher.batches,
            "batch_sizes": {str(k): v for k, v in sizes.items()},
            "mean_batch_size": (sum(k * v for k, v in sizes.items()) / n) if n else None,
            "dropped": batcher.expired,
            "requests": dict(sorted(stats.requests.items())),
            "status_codes": {str(k): v for k, v in sorted(stats.status.items())},
            "config": dataclasses.asdict(config),
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> Any:
        return HTMLResponse(_page().replace("__TASKS__", json.dumps(sorted(pipes))))

    app.add_middleware(_LimitBody, limit=config.max_upload_bytes, stats=stats)
    return app


def _parse_labels(labels: str) -> list[str] | str:
    """Class names from a form field: a JSON list, or comma-separated (checked by the pipeline)."""
    text = labels.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            return text
        if isinstance(value, list):
            return [str(v) for v in value]
    return text


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn (blocking)."""
    try:
        import uvicorn
    except ImportError as err:
        raise ImportError("imglish serve needs FastAPI and uvicorn: pip install 'imglish[serve]'") from err
    uvicorn.run(app, host=host, port=port, log_level=log_level)
