"""``jds serve``: an OpenAI-compatible server over the inference engine.

Two layers:

* **The engine thread** (``EngineLoop``) owns the ``InferenceEngine`` and runs
  ``engine.step()`` while any request is in flight (continuous batching: requests join and
  leave between steps). It hands each request's tokens to the HTTP side as the step that
  made them finishes. While nothing is in flight it compiles, one at a time, the pass shapes
  no request has needed yet (``engine.warmup_variants``), so the server answers within
  seconds of start and later requests do not wait for compiles.
* **The HTTP layer** is an ASGI app (Starlette) served by uvicorn (the ``serve`` extra):
  ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions``, ``POST
  /v1/chat/completions`` (plain, or streamed as server-sent events with ``stream: true``),
  ``GET /health``, ``GET /metrics`` (Prometheus text: requests, tokens, queue length, KV-cache
  use, time to first token, inter-token and request latency). Requests are pydantic models
  (``protocol.py``: what each OpenAI field does); every refusal is OpenAI's error body with
  a 4xx naming the field. The body is read with a size limit (413) and a read timeout per
  chunk (408), JSON that does not parse (nested too deep, say) is a 400, a request that runs
  past ``request_timeout`` is cancelled (504), and when more than ``max_queue`` requests wait
  beyond the engine's ``max_seqs`` a new one gets a 503 instead of a place in an unbounded
  queue. With ``api_key`` set, ``/v1/*`` needs ``Authorization: Bearer <key>`` (401).
  Shutdown (SIGINT/SIGTERM, or ``shutdown()``) stops accepting connections, lets in-flight
  requests and streams finish for up to ``shutdown_timeout`` seconds, cancels the rest, and
  stops the engine thread. A streaming client that disconnects cancels its request; its KV
  blocks return to the cache.

Text is decoded as tokens come: a character split across tokens is sent once complete, and
one left unfinished at the end comes out as U+FFFD, so streamed pieces join into the
non-streamed text. A stop string ends the text before it (streaming holds back the last
``longest stop - 1`` characters, so a stop string split across tokens is never sent) and
cancels the request in the engine. Generation also stops at the tokenizer's end-of-sequence
ids. ``n`` choices of one prompt share its KV blocks: choice 0 runs first, the others are
submitted when its prompt is computed and published in the prefix cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import queue
import secrets
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from jds.inference.engine import InferenceEngine
from jds.inference.protocol import BadRequest, ChatRequest, CompletionRequest, parse
from jds.inference.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    ByteTokenizer,
    HFTokenizer,
    TemplateError,
    render_chat,
    tokenizer_for,
)

log = logging.getLogger("jds.serve")


def require_serve_extra() -> None:
    """Raise a clear ImportError when the ``serve`` extra is missing."""
    try:
        import jinja2  # noqa: F401
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import tokenizers  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"jds serve needs the serve extra ({e.name} is missing): "
                          "pip install 'jds[serve]'") from None


class _Job:
    """One engine request: its arguments, and the events the engine thread sends back
    (``("token", id, logprobs)``, then ``("done", reason)`` or ``("error", msg, status)``)."""

    def __init__(self, args: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        self.args, self.loop = args, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.rid: int | None = None
        self.count = 0  # tokens sent so far
        self.finished = False
        self.counted = True  # in the server's in_flight count

    def put(self, item: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class EngineLoop:
    """The thread that owns the engine: submits jobs, steps, routes tokens, and warms the
    remaining pass shapes while idle."""

    def __init__(self, engine: InferenceEngine, *, warm: bool = True) -> None:
        self.engine = engine
        self.pending_warm = list(engine.warmup_variants()) if warm else []
        self.warm_total = len(self.pending_warm)
        self._inbox: queue.Queue = queue.Queue()
        self._jobs: dict[int, _Job] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jds-engine", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        self._inbox.put(job)

    def cancel(self, job: _Job) -> None:
        """End ``job`` early (a stop string, a timeout, the client left): done on the
        engine's thread between steps; its KV blocks return to the cache."""
        self._inbox.put(("cancel", job))

    def close(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=60)

    def _take(self, block: bool) -> None:
        while True:
            try:
                job = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if job is None:
                return
            if isinstance(job, tuple):  # ("cancel", job)
                victim = job[1]
                if victim.rid is not None and victim.rid in self._jobs:
                    self.engine.cancel(victim.rid)
                    self.engine.release(victim.rid)
                    del self._jobs[victim.rid]
                    victim.put(("done", "cancelled"))
                continue
            try:
                job.rid = self.engine.submit(**job.args)
                self._jobs[job.rid] = job
            except ValueError as e:
                job.put(("error", str(e), 400))
            except Exception as e:  # noqa: BLE001 - fail this request, keep the thread
                log.exception("submitting a request failed")
                job.put(("error", f"engine error: {type(e).__name__}: {e}", 500))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take(block=not self._jobs and not self.pending_warm)
            if not self._jobs:
                if self.pending_warm and not self._stop.is_set():
                    variant = self.pending_warm.pop(0)
                    try:
                        self.engine.warm(variant)
                    except Exception as e:  # noqa: BLE001 - a request will compile it
                        log.warning("warming %s failed: %s", variant, e)
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - fail the requests, keep serving
                log.exception("engine step failed")
                for job in self._jobs.values():
                    job.put(("error", f"engine error: {type(e).__name__}: {e}", 500))
                for rid in list(self._jobs):
                    req = self.engine.result(rid)
                    if req.finish_reason is None:
                        self.engine.scheduler.finish(req, "error")
                    self.engine.release(rid)
                self._jobs.clear()
                continue
            for rid, tok, done in events:
                job = self._jobs[rid]
                req = self.engine.result(rid)
                lp = req.token_logprobs[job.count] if req.logprobs is not None else None
                job.count += 1
                job.put(("token", tok, lp))
                if done:
                    job.put(("done", req.finish_reason))
                    self.engine.release(rid)
                    del self._jobs[rid]


class _StopFilter:
    """Text of a completion cut before the first stop string. Streaming holds back the last
    ``longest stop - 1`` characters, so a stop string split across tokens is never sent."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.text, self.sent, self.hit = stops, "", 0, False
        self.hold = max((len(x) for x in stops), default=1) - 1

    def feed(self, piece: str) -> str:
        """Add decoded text; return what may be sent now."""
        self.text += piece
        cut = min((i for i in (self.text.find(x) for x in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit, self.text = True, self.text[:cut]
            end = len(self.text)
        else:
            end = max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


class _Metrics:
    """Prometheus metrics of one server (its own registry)."""

    def __init__(self, server: CompletionServer) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
        )

        disable_created_metrics()  # no *_created series beside every counter

        self.registry = r = CollectorRegistry()
        self.requests = Counter("jds_requests", "HTTP requests answered", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("jds_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("jds_generation_tokens", "tokens generated",
                                         registry=r)
        buckets = (.005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 20, 60)
        self.ttft = Histogram("jds_time_to_first_token_seconds", "request start to its first "
                              "token", buckets=buckets, registry=r)
        self.itl = Histogram("jds_inter_token_latency_seconds", "time between a choice's tokens",
                             buckets=buckets, registry=r)
        self.latency = Histogram("jds_request_latency_seconds", "request start to its end",
                                 buckets=buckets, registry=r)
        eng = server.engine
        Gauge("jds_requests_running", "sequences in the engine's batch", registry=r
              ).set_function(lambda: len(eng.scheduler.running))
        Gauge("jds_requests_waiting", "engine requests queued behind the batch", registry=r
              ).set_function(lambda: max(server.in_flight - len(eng.scheduler.running), 0))
        Gauge("jds_kv_cache_usage_ratio", "fraction of KV-cache blocks in use", registry=r
              ).set_function(lambda: 1 - eng.allocator.num_free / eng.allocator.capacity)
        Gauge("jds_compile_pending", "pass shapes not compiled yet", registry=r
              ).set_function(lambda: len(server.loop.pending_warm))
        r.register(_PrefixHits(eng))


class _PrefixHits:
    """``jds_prefix_cache_hit_tokens_total``: prompt tokens whose K/V came from the prefix
    cache (a counter kept by the scheduler, read at scrape time)."""

    def __init__(self, engine: InferenceEngine) -> None:
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily("jds_prefix_cache_hit_tokens", "prompt tokens whose K/V came "
                                  "from the prefix cache",
                                  value=self.engine.scheduler.prefix_hit_tokens)


class CompletionServer:
    """The OpenAI-compatible server around an ``EngineLoop`` (see the module docstring).

    ``serve_forever()`` runs it (on this thread; SIGINT/SIGTERM shut it down gracefully when
    that is the main thread); ``shutdown()`` from another thread does the same. ``port=0``
    binds a free port (``server.port``).
    """

    def __init__(self, engine: InferenceEngine, *, host: str = "127.0.0.1", port: int = 8000,
                 model_name: str = "jds", tokenizer: Any = None, api_key: str | None = None,
                 chat_template: str | None = None, max_queue: int = 256,
                 request_timeout: float = 600.0, read_timeout: float = 30.0,
                 max_body_bytes: int = 4 << 20, shutdown_timeout: float = 30.0,
                 warm: bool = True) -> None:
        require_serve_extra()
        self.engine, self.model_name, self.tokenizer = engine, model_name, tokenizer
        self.api_key, self.max_queue = api_key, max_queue
        self.request_timeout, self.read_timeout = request_timeout, read_timeout
        self.max_body_bytes, self.shutdown_timeout = max_body_bytes, shutdown_timeout
        self.chat_template = chat_template or (tokenizer.chat_template if tokenizer else None)
        self.created = int(time.time())
        self.in_flight = 0  # engine requests admitted and not finished (event-loop thread)
        self.loop = EngineLoop(engine, warm=warm)
        self.metrics = _Metrics(self)
        self.app = self._app()
        self._sock = socket.create_server((host, port), backlog=2048)
        self._uvicorn: Any = None
        self._done = threading.Event()
        self._done.set()

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    # ------------------------------------------------------------------ running
    def serve_forever(self) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            """uvicorn's server, but a SIGTERM / SIGINT ends ``serve_forever`` normally after
            the graceful shutdown (uvicorn re-raises the signal, which would kill the process
            before the engine thread stops); a second one forces the exit."""

            @contextlib.contextmanager
            def capture_signals(self):
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                old = {sig: signal.signal(sig, self.handle_exit)
                       for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in old.items():
                        signal.signal(sig, handler)

        config = uvicorn.Config(self.app, log_level="warning", access_log=False,
                                timeout_keep_alive=5, lifespan="off",
                                timeout_graceful_shutdown=self.shutdown_timeout)
        self._uvicorn = Server(config)
        self._done.clear()
        try:
            self._uvicorn.run(sockets=[self._sock])
        finally:
            self.loop.close()  # after in-flight requests finished (or were cancelled)
            self._done.set()

    def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish (up to ``shutdown_timeout`` s),
        stop the engine thread."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            self._done.wait(self.shutdown_timeout + 30)
        else:
            self._sock.close()
            self.loop.close()

    # ------------------------------------------------------------------ the app
    def _app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def http_error(request, exc: HTTPException):
            err = BadRequest(f"no route {request.method} {request.url.path}; see GET "
                             "/v1/models, POST /v1/completions, POST /v1/chat/completions",
                             exc.status_code)
            return JSONResponse(err.body(), status_code=exc.status_code)

        e = self._endpoint
        routes = [Route("/health", self._health, methods=["GET"]),
                  Route("/metrics", self._metrics, methods=["GET"]),
                  Route("/v1/models", e(self._models, "models"), methods=["GET"]),
                  Route("/v1/models/{model_id:path}", e(self._model, "models"),
                        methods=["GET"]),
                  Route("/v1/completions", e(self._completions, "completions"),
                        methods=["POST"]),
                  Route("/v1/chat/completions", e(self._chat, "chat"), methods=["POST"])]
        return Starlette(routes=routes, exception_handlers={HTTPException: http_error})

    def _endpoint(self, fn: Any, name: str) -> Any:
        """``fn`` with the API key check, OpenAI error bodies and the request counter."""
        from starlette.requests import ClientDisconnect
        from starlette.responses import JSONResponse, Response

        async def handler(request):
            status = 500
            try:
                self._authorize(request)
                response = await fn(request)
                status = response.status_code
                return response
            except BadRequest as err:
                status = err.status
                headers = {"Retry-After": "1"} if err.status == 503 else {}
                if err.status in (408, 413):
                    headers["Connection"] = "close"
                return JSONResponse(err.body(), status_code=err.status, headers=headers)
            except ClientDisconnect:
                status = 499
                return Response(status_code=499)
            except Exception as exc:  # noqa: BLE001 - a 500 with the reason, keep serving
                log.exception("request failed")
                err = BadRequest(f"internal error: {type(exc).__name__}: {exc}", 500)
                return JSONResponse(err.body(), status_code=500)
            finally:
                self.metrics.requests.labels(name, str(status)).inc()

        return handler

    def _authorize(self, request: Any) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self.api_key.encode()):
            raise BadRequest("missing or wrong API key: send 'Authorization: Bearer <key>' "
                             "with the key jds serve was started with (--api-key)", 401,
                             code="invalid_api_key")

    async def _health(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok", "model": self.model_name,
                             "compiled": self.loop.warm_total - len(self.loop.pending_warm),
                             "to_compile": self.loop.warm_total})

    async def _metrics(self, request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response

        return Response(generate_latest(self.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "jds", "max_model_len": self.engine.max_len}

    async def _models(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def _model(self, request):
        from starlette.responses import JSONResponse

        self._check_model(request.path_params["model_id"])
        return JSONResponse(self._model_card())

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise BadRequest(f"The model '{name}' does not exist; this server serves "
                             f"'{self.model_name}' (jds serve --served-model-name)", 404,
                             param="model", code="model_not_found")

    async def _read_json(self, request: Any) -> Any:
        """The body as JSON, read with the size limit (413) and the read timeout (408)."""
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
            raise BadRequest(f"the body is {size} bytes; this server takes at most "
                             f"{self.max_body_bytes} (--max-body-bytes)", 413)
        data, stream = bytearray(), request.stream()
        while True:
            try:
                chunk = await asyncio.wait_for(anext(stream), self.read_timeout)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise BadRequest(f"the request body did not arrive within "
                                 f"{self.read_timeout:g} s", 408) from None
            data += chunk
            if len(data) > self.max_body_bytes:
                raise BadRequest(f"the body is over {self.max_body_bytes} bytes, the most "
                                 "this server takes (--max-body-bytes)", 413)
        try:
            return json.loads(bytes(data) or b"null")
        except RecursionError:
            raise BadRequest("the body is not JSON this server reads: nested too deeply"
                             ) from None
        except ValueError as e:
            raise BadRequest(f"the body is not JSON: {e}") from None

    # ------------------------------------------------------------------ requests
    def _encode_prompts(self, prompt: Any) -> list[tuple[list[int], str | None]]:
        """A completions ``prompt`` as ``(ids, text)`` per prompt."""
        many = isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)
        out = []
        for p in (prompt if many else [prompt]):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise BadRequest("this model has no tokenizer; send 'prompt' as a list of "
                                     "token ids", param="prompt")
                out.append((self.tokenizer.encode(p), p))
            else:
                out.append((list(p), None))
        if not out or any(not ids for ids, _ in out):
            raise BadRequest("'prompt' must not be empty", param="prompt")
        return out

    def _stops(self, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > 4 or not all(stops):
            raise BadRequest(f"'stop' must be a non-empty string or a list of 1 to 4 of them; "
                             f"got {stop!r}", param="stop")
        if stops and self.tokenizer is None:
            raise BadRequest("'stop' strings need a tokenizer and this model has none; use "
                             "'stop_token_ids'", param="stop")
        return stops

    def _engine_args(self, req: Any, ids: list[int], max_new: int | None,
                     logprobs: int | None) -> dict[str, Any]:
        limit = self.engine.max_len
        if max_new is None:  # chat without a limit: up to the context, as OpenAI
            max_new = max(limit - len(ids), 1)
        if len(ids) + max_new > limit:
            name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) \
                else "max_tokens"
            raise BadRequest(
                f"the prompt ({len(ids)} tokens) plus '{name}' ({max_new}) exceed the context "
                f"of {limit} tokens; ask for at most {max(limit - len(ids), 0)} new tokens (or "
                "serve with a larger --max-tokens)", param=name)
        stop_ids = list(req.stop_token_ids or []) + list(
            getattr(self.tokenizer, "eos_ids", ()) or ())
        return {"prompt": ids, "max_new_tokens": max_new,
                "temperature": 1.0 if req.temperature is None else float(req.temperature),
                "top_p": None if req.top_p is None else float(req.top_p), "top_k": req.top_k,
                "seed": secrets.randbits(31) if req.seed is None else int(req.seed),
                "stop_tokens": stop_ids, "logprobs": logprobs,
                "presence_penalty": float(req.presence_penalty or 0),
                "frequency_penalty": float(req.frequency_penalty or 0),
                "logit_bias": {int(k): float(v) for k, v in (req.logit_bias or {}).items()}}

    def _admit(self, n_jobs: int) -> None:
        room = self.engine.config.max_seqs + self.max_queue - self.in_flight
        if n_jobs > room:
            raise BadRequest(f"the server is at capacity ({self.in_flight} requests in flight, "
                             f"{self.engine.config.max_seqs} running and up to "
                             f"{self.max_queue} waiting: --max-queue); retry shortly", 503,
                             code="server_overloaded")

    async def _generate(self, specs: list[tuple[int, dict[str, Any], str]], stops: list[str],
                        start: float) -> AsyncIterator[tuple]:
        """Run ``specs`` (``(choice index, engine args, prompt group)``) and yield
        ``(index, token ids, text, logprobs, finish reason or None)`` as tokens come, from
        every choice interleaved. Choice 0 of a group runs first and the group's others
        join once its prompt is in the (prefix) cache."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        jobs = [_Job(args, loop) for _, args, _ in specs]
        leaders: dict[str, asyncio.Event] = {}
        deadline = start + self.request_timeout
        self.in_flight += len(jobs)

        def uncount(job: _Job) -> None:  # once per job, whether or not its task ever ran
            if job.counted:
                job.counted = False
                self.in_flight -= 1

        async def run(index: int, job: _Job, group: str) -> None:
            leader = group not in leaders
            ready = leaders.setdefault(group, asyncio.Event())
            if not leader:
                await ready.wait()
            self.loop.submit(job)
            decode = self.tokenizer.decoder() if self.tokenizer is not None else None
            filt, last = _StopFilter(stops), None
            try:
                while True:
                    item = await job.events.get()
                    now = time.perf_counter()
                    if item[0] != "token":
                        ready.set()
                        job.finished = True
                        if item[0] == "error":
                            await out.put((index, None, item[1], item[2], "error"))
                            return
                        tail = filt.feed(decode.flush()) if decode else ""
                        await out.put((index, [], tail + filt.flush(), [],
                                       "stop" if filt.hit else item[1]))
                        return
                    ready.set()
                    _, tok, lp = item
                    if last is None:
                        self.metrics.ttft.observe(now - start)
                    else:
                        self.metrics.itl.observe(now - last)
                    last = now
                    self.metrics.generation_tokens.inc()
                    text = filt.feed(decode([tok])) if decode else ""
                    if filt.hit:
                        self.loop.cancel(job)
                        job.finished = True
                        await out.put((index, [tok], text + filt.flush(), [lp] if lp else [],
                                       "stop"))
                        return
                    await out.put((index, [tok], text, [lp] if lp else [], None))
            finally:
                ready.set()
                uncount(job)

        tasks = [asyncio.create_task(run(i, job, g))
                 for (i, _, g), job in zip(specs, jobs, strict=True)]
        remaining = len(tasks)
        try:
            while remaining:
                try:
                    ev = await asyncio.wait_for(out.get(), max(deadline - time.perf_counter(),
                                                               0.001))
                except TimeoutError:
                    raise BadRequest(f"the request ran past {self.request_timeout:g} s "
                                     "(--request-timeout) and was cancelled", 504) from None
                if ev[4] == "error":
                    raise BadRequest(ev[2], ev[3])
                if ev[4] is not None:
                    remaining -= 1
                yield ev
        finally:
            for job, task in zip(jobs, tasks, strict=True):
                if not job.finished:
                    self.loop.cancel(job)  # a timeout, an error, or the client left
                task.cancel()
                uncount(job)  # a task cancelled before it ran never reaches its finally
            self.metrics.latency.observe(time.perf_counter() - start)

    async def _respond(self, specs, stops, stream: bool, usage_prompt: int, include_usage: bool,
                       chunk, final) -> Any:
        """Run the choices; a JSON body built by ``final`` from each choice's ``(ids, text,
        logprobs, reason)``, or a server-sent event stream of ``chunk(index, ids, text,
        logprobs, reason)`` objects (and a usage chunk when asked)."""
        from starlette.responses import JSONResponse, StreamingResponse

        start = time.perf_counter()
        gen = self._generate(specs, stops, start)
        usage = {"prompt_tokens": usage_prompt, "completion_tokens": 0, "total_tokens": 0}
        if not stream:
            got = {i: ([], "", [], None) for i, _, _ in specs}
            try:
                async for index, ids, text, lps, reason in gen:
                    t, s, p, _ = got[index]
                    got[index] = (t + ids, s + text, p + lps, reason)
            finally:
                await gen.aclose()
            usage["completion_tokens"] = sum(len(v[0]) for v in got.values())
            usage["total_tokens"] = usage_prompt + usage["completion_tokens"]
            return JSONResponse(final([got[i] for i in sorted(got)], usage))
        first = await anext(gen)  # an error before any token is an HTTP error

        async def events() -> AsyncIterator[bytes]:
            n_tokens = 0
            try:
                ev = first
                while True:
                    n_tokens += len(ev[1])
                    yield f"data: {json.dumps(chunk(*ev))}\n\n".encode()
                    try:
                        ev = await anext(gen)
                    except StopAsyncIteration:
                        break
                    except BadRequest as err:
                        yield f"data: {json.dumps(err.body())}\n\n".encode()
                        break
                if include_usage:
                    usage["completion_tokens"] = n_tokens
                    usage["total_tokens"] = usage_prompt + n_tokens
                    yield f"data: {json.dumps(final(None, usage))}\n\n".encode()
                yield b"data: [DONE]\n\n"
            finally:
                await gen.aclose()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _completions(self, request):
        req = parse(CompletionRequest, await self._read_json(request))
        self._check_model(req.model)
        prompts = self._encode_prompts(req.prompt)
        stops = self._stops(req.stop)
        specs = []
        for p, (ids, _) in enumerate(prompts):
            args = self._engine_args(req, ids, req.max_tokens, req.logprobs)
            for j in range(req.n):
                specs.append((p * req.n + j, {**args, "seed": args["seed"] + j}, str(p)))
        self._admit(len(specs))
        self.metrics.prompt_tokens.inc(sum(len(ids) for ids, _ in prompts))
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        echo = {i: "" for i, _, _ in specs}
        if req.echo:
            for i, _, g in specs:
                ids, text = prompts[int(g)]
                echo[i] = text if text is not None else (decode(ids) if decode else "")
        offsets = {i: len(echo[i]) for i, _, _ in specs}

        def logprobs(index: int, ids: list[int], lps: list) -> dict | None:
            if req.logprobs is None:
                return None
            tok = self.tokenizer.token_text if self.tokenizer is not None else str
            out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for t, (c, top) in zip(ids, lps, strict=True):
                out["tokens"].append(tok(t))
                out["token_logprobs"].append(c)
                out["top_logprobs"].append({tok(i): v for i, v in top})
                out["text_offset"].append(offsets[index])
                offsets[index] += len(out["tokens"][-1])
            return out

        def head(choices: list) -> dict:
            return {"id": rid, "object": "text_completion", "created": created,
                    "model": self.model_name, "choices": choices}

        def chunk(index, ids, text, lps, reason):
            if echo[index]:
                text, echo[index] = echo[index] + text, ""
            return head([{"index": index, "text": text, "tokens": ids,
                          "logprobs": logprobs(index, ids, lps), "finish_reason": reason}])

        def final(results, usage):
            if results is None:  # the stream's usage chunk
                return {**head([]), "usage": usage}
            return {**head([{"index": i, "text": echo[i] + text, "tokens": ids,
                             "logprobs": logprobs(i, ids, lps), "finish_reason": reason}
                            for i, (ids, text, lps, reason) in enumerate(results)]),
                    "usage": usage}

        include = bool(req.stream_options and req.stream_options.include_usage)
        return await self._respond(specs, stops, req.stream,
                                   sum(len(ids) for ids, _ in prompts), include, chunk, final)

    def _chat_prompt(self, req: ChatRequest) -> list[int]:
        if self.tokenizer is None:
            raise BadRequest("this model has no tokenizer, which chat needs; use "
                             "/v1/completions with token ids", param="messages")
        messages = []
        for m in req.messages:
            msg: dict[str, Any] = {"role": m.role, "content": m.text()}
            if m.name is not None:
                msg["name"] = m.name
            messages.append(msg)
        tok = self.tokenizer
        try:
            text = render_chat(self.chat_template or DEFAULT_CHAT_TEMPLATE, messages,
                               special_tokens=getattr(tok, "special_tokens", {}),
                               **(req.chat_template_kwargs or {}))
        except TemplateError as e:
            raise BadRequest(f"the chat template refused the messages: {e}",
                             param="messages") from None
        return tok.encode(text, add_special_tokens=False)

    async def _chat(self, request):
        req = parse(ChatRequest, await self._read_json(request))
        self._check_model(req.model)
        ids = self._chat_prompt(req)
        stops = self._stops(req.stop)
        top = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        args = self._engine_args(req, ids, req.max_completion_tokens or req.max_tokens, top)
        specs = [(j, {**args, "seed": args["seed"] + j}, "0") for j in range(req.n)]
        self._admit(len(specs))
        self.metrics.prompt_tokens.inc(len(ids))
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        tok = self.tokenizer
        began: set[int] = set()

        def entry(token: str, logprob: float) -> dict:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        def logprobs(ids: list[int], lps: list) -> dict | None:
            if top is None:
                return None
            return {"content": [{**entry(tok.token_text(t), c),
                                 "top_logprobs": [entry(tok.token_text(i), v) for i, v in tp]}
                                for t, (c, tp) in zip(ids, lps, strict=True)],
                    "refusal": None}

        def head(obj: str, choices: list) -> dict:
            return {"id": rid, "object": obj, "created": created, "model": self.model_name,
                    "system_fingerprint": None, "choices": choices}

        def chunk(index, ids, text, lps, reason):
            delta: dict[str, Any] = {"content": text} if text or reason is None else {}
            if index not in began:
                began.add(index)
                delta = {"role": "assistant", **delta, "content": text}
            return head("chat.completion.chunk", [{"index": index, "delta": delta,
                                                   "logprobs": logprobs(ids, lps),
                                                   "finish_reason": reason}])

        def final(results, usage):
            if results is None:
                return {**head("chat.completion.chunk", []), "usage": usage}
            return {**head("chat.completion", [
                {"index": i, "message": {"role": "assistant", "content": text,
                                         "refusal": None},
                 "logprobs": logprobs(ids, lps), "finish_reason": reason}
                for i, (ids, text, lps, reason) in enumerate(results)]), "usage": usage}

        include = bool(req.stream_options and req.stream_options.include_usage)
        return await self._respond(specs, stops, req.stream, len(ids), include, chunk, final)


__all__ = ["BadRequest", "ByteTokenizer", "CompletionServer", "EngineLoop", "HFTokenizer",
           "require_serve_extra", "tokenizer_for"]
