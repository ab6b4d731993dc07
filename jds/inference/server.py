"""``jds serve``: an OpenAI-compatible ``/v1/completions`` HTTP server over the engine.

One background thread owns the ``InferenceEngine`` and runs ``engine.step()`` while any
request is in flight (continuous batching: requests join and leave between steps); HTTP
handler threads submit requests to it through a queue and read their tokens from
per-request queues, so a streamed response (server-sent events, as OpenAI's ``stream:
true``) sends each token as the step that made it finishes.

Standard library only (``http.server``): the server has no dependency the core does not.
A bad request gets a 4xx with an OpenAI-style ``{"error": {...}}`` body naming the field;
an error inside the engine fails that request with a 500 and the server keeps serving.

Requests: ``prompt`` (a string, or a list of token ids), ``max_tokens`` (default 16),
``temperature`` (default 1.0, 0 = greedy), ``top_p``, ``top_k``, ``seed``, ``stop`` (up to
4 strings: the text ends before the first one and the request is cancelled in the engine),
``stop_token_ids``, ``stream``; ``user`` is accepted and ignored. OpenAI fields that would
change the answer and are not built yet (``n``, ``best_of``, ``logprobs``, ``echo``,
``suffix``, ``presence_penalty``, ``frequency_penalty``, ``logit_bias``,
``stream_options``) get a 400 naming
the field unless they are at their "off" value, and a prompt plus ``max_tokens`` longer
than the context gets a 400 with the numbers (vLLM's behaviour), instead of being
silently capped. A streaming client that disconnects cancels its request.
Strings are tokenized by the model's tokenizer: bytes for
the byte-level presets (vocab 256), a Hugging Face tokenizer (``tokenizer.json`` in the
model folder, read with ``transformers`` when installed) otherwise. Text is decoded as
tokens come: a character split across tokens is sent once complete, and one left unfinished
at the end comes out as U+FFFD, so streamed pieces join into the non-streamed text, which is
the whole answer decoded at once.
"""

from __future__ import annotations

import codecs
import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from jds.inference.engine import InferenceEngine


class BadRequest(ValueError):
    """A request the server refuses with a 4xx (the message names the field)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ByteTokenizer:
    """UTF-8 bytes as token ids (the byte-level presets, vocab 256)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decoder(self) -> _ByteDecoder:
        """An incremental decoder: feed token ids, get the text completed so far."""
        return _ByteDecoder()


class _ByteDecoder:
    """UTF-8 decoded as bytes arrive: an incomplete character is held back until the bytes
    that complete it come, or until ``flush``."""

    def __init__(self) -> None:
        self._inc = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, ids: list[int]) -> str:
        return self._inc.decode(bytes(ids))

    def flush(self) -> str:
        """The held-back bytes of an unfinished character, as U+FFFD (``errors="replace"``,
        what decoding all the bytes at once gives)."""
        return self._inc.decode(b"", final=True)


class HFTokenizer:
    """A Hugging Face tokenizer from the model folder (needs ``transformers``)."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(path))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text))

    def decoder(self) -> _HFDecoder:
        """An incremental decoder: feed token ids, get the text completed so far."""
        return _HFDecoder(self._tok)


class _HFDecoder:
    """A Hugging Face tokenizer's text, grown token by token. Text that ends in U+FFFD (the
    bytes of a character split across tokens) is held back until a later token completes
    it, or until ``flush``."""

    def __init__(self, tok: Any) -> None:
        self._tok, self._ids, self._text = tok, [], ""

    def _new(self, final: bool) -> str:
        text = self._tok.decode(self._ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):  # an incomplete character: wait
            return ""
        new, self._text = text[len(self._text):], text
        return new

    def __call__(self, ids: list[int]) -> str:
        self._ids.extend(ids)
        return self._new(final=False)

    def flush(self) -> str:
        """What was held back, as the tokenizer decodes it (U+FFFD for an unfinished
        character, as decoding the whole answer at once gives)."""
        return self._new(final=True)


def tokenizer_for(model: str | Path, vocab_size: int) -> ByteTokenizer | HFTokenizer | None:
    """The tokenizer strings are encoded with, or None (token-id prompts only)."""
    path = Path(str(model))
    if path.is_dir() and any((path / f).exists() for f in ("tokenizer.json",
                                                           "tokenizer_config.json")):
        try:
            return HFTokenizer(path)
        except ImportError:
            return ByteTokenizer() if vocab_size == 256 else None
    return ByteTokenizer() if vocab_size == 256 else None


class _Job:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args
        self.tokens: queue.Queue = queue.Queue()  # ints, then ("done", reason) or ("error", msg)
        self.rid: int | None = None


class EngineLoop:
    """The thread that owns the engine: submits queued jobs, steps, routes tokens."""

    def __init__(self, engine: InferenceEngine) -> None:
        self.engine = engine
        self._inbox: queue.Queue[_Job] = queue.Queue()
        self._jobs: dict[int, _Job] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jds-engine", daemon=True)
        self._thread.start()

    def submit(self, args: dict[str, Any]) -> _Job:
        job = _Job(args)
        self._inbox.put(job)
        return job

    def cancel(self, job: _Job) -> None:
        """End ``job`` early (a stop string was seen, or the client left): done on the
        engine's thread between steps; its KV blocks return to the cache."""
        self._inbox.put(("cancel", job))  # type: ignore[arg-type]

    def close(self) -> None:
        self._stop.set()
        self._inbox.put(None)  # type: ignore[arg-type]
        self._thread.join(timeout=30)

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
                    victim.tokens.put(("done", "stop"))
                continue
            try:
                job.rid = self.engine.submit(**job.args)
                self._jobs[job.rid] = job
            except ValueError as e:
                job.tokens.put(("error", str(e), 400))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take(block=not self._jobs)
            if not self._jobs:
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - fail the requests, keep serving
                for job in self._jobs.values():
                    job.tokens.put(("error", f"engine error: {type(e).__name__}: {e}", 500))
                for rid in list(self._jobs):
                    req = self.engine.result(rid)
                    if req.finish_reason is None:
                        self.engine.scheduler.finish(req, "error")
                    self.engine.release(rid)
                self._jobs.clear()
                continue
            for rid, tok, done in events:
                job = self._jobs[rid]
                job.tokens.put(tok)
                if done:
                    job.tokens.put(("done", self.engine.result(rid).finish_reason))
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


# OpenAI completion fields that would change the answer and that jds does not implement
# yet: (name, the value that means "off", what it asks for). ``user`` is accepted and ignored.
_NOT_YET = (("n", 1, "several choices per prompt"), ("best_of", 1, "several candidates"),
            ("logprobs", None, "token log-probabilities"), ("echo", False, "the prompt echoed"),
            ("suffix", None, "text after the completion"),
            ("presence_penalty", 0, "a presence penalty"),
            ("frequency_penalty", 0, "a frequency penalty"), ("logit_bias", None, "logit bias"),
            ("stream_options", None, "usage in the stream"))


def _field(body: dict, name: str, kind: type | tuple, default: Any, check=None, hint=""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise BadRequest(f"'{name}' must be {hint or kind}; got {value!r}")
    if check is not None and not check(value):
        raise BadRequest(f"'{name}' must be {hint}; got {value!r}")
    return value


class CompletionServer:
    """The HTTP server (``serve_forever`` / ``shutdown``) around an ``EngineLoop``."""

    def __init__(self, engine: InferenceEngine, *, host: str = "127.0.0.1", port: int = 8000,
                 model_name: str = "jds", tokenizer: Any = None) -> None:
        self.engine, self.model_name, self.tokenizer = engine, model_name, tokenizer
        self.loop = EngineLoop(engine)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # quiet; errors go to the client
                pass

            def _send_json(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, message: str) -> None:
                kind = "invalid_request_error" if status < 500 else "server_error"
                self._send_json(status, {"error": {"message": message, "type": kind}})

            def do_GET(self):  # noqa: N802
                if self.path == "/health":
                    self._send_json(200, {"status": "ok"})
                elif self.path == "/v1/models":
                    self._send_json(200, {"object": "list", "data": [
                        {"id": server.model_name, "object": "model", "owned_by": "jds"}]})
                else:
                    self._error(404, f"no route GET {self.path}; try POST /v1/completions")

            def do_POST(self):  # noqa: N802
                if self.path != "/v1/completions":
                    self._error(404, f"no route POST {self.path}; try POST /v1/completions")
                    return
                try:
                    n = int(self.headers.get("Content-Length") or 0)
                    try:
                        body = json.loads(self.rfile.read(n) or b"null")
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise BadRequest(f"the body is not JSON: {e}") from None
                    if not isinstance(body, dict):
                        raise BadRequest("the body must be a JSON object")
                    args, prompt_ids, stream, stops = server.parse(body)
                except BadRequest as e:
                    self._error(e.status, str(e))
                    return
                job = server.loop.submit(args)
                server.respond(self, job, prompt_ids, stream, stops)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def parse(self, body: dict) -> tuple[dict[str, Any], list[int], bool, list[str]]:
        """Validate a completions request: engine arguments, prompt ids, stream flag, stop
        strings."""
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise BadRequest("this model has no tokenizer; send 'prompt' as a list of "
                                 "token ids")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise BadRequest("'prompt' must be a non-empty string or a list of token ids")
        args = {
            "prompt": ids,
            "max_new_tokens": _field(body, "max_tokens", int, 16, lambda v: v >= 1,
                                     "an integer >= 1"),
            "temperature": float(_field(body, "temperature", (int, float), 1.0,
                                        lambda v: v >= 0, "a number >= 0")),
            "top_p": _field(body, "top_p", (int, float), None, lambda v: 0 < v <= 1,
                            "a number in (0, 1]"),
            "top_k": _field(body, "top_k", int, None, lambda v: v >= 1, "an integer >= 1"),
            "seed": _field(body, "seed", int, 0, None, "an integer"),
            "stop_tokens": _field(body, "stop_token_ids", list, None,
                                  lambda v: all(isinstance(t, int) for t in v),
                                  "a list of token ids"),
        }
        if args["top_p"] is not None:
            args["top_p"] = float(args["top_p"])
        for name, off, what in _NOT_YET:  # OpenAI fields jds does not act on: say so
            if body.get(name, off) not in (off, None):
                raise BadRequest(f"'{name}' is not supported by jds serve yet ({what}); "
                                 f"leave it out or send {off!r}")
        limit = self.engine.max_len
        if len(ids) + args["max_new_tokens"] > limit:
            raise BadRequest(
                f"the prompt ({len(ids)} tokens) plus 'max_tokens' ({args['max_new_tokens']}) "
                f"exceed the context of {limit} tokens; ask for at most "
                f"{max(limit - len(ids), 0)} new tokens (or serve with a larger --max-tokens)")
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and not (isinstance(stops, list) and 0 < len(stops) <= 4 and all(
                isinstance(x, str) and x for x in stops)):
            raise BadRequest(f"'stop' must be a non-empty string or a list of 1 to 4 of them; "
                             f"got {stop!r}")
        if stops and self.tokenizer is None:
            raise BadRequest("'stop' strings need a tokenizer and this model has none; use "
                             "'stop_token_ids'")
        stream = _field(body, "stream", bool, False, None, "true or false")
        return args, ids, stream, stops or []

    def _chunk(self, rid: Any, text: str, tokens: list[int], reason: str | None) -> dict:
        return {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": [{"index": 0, "text": text,
                                                       "tokens": tokens,
                                                       "finish_reason": reason}]}

    def _tokens(self, job: _Job, stops: list[str]):
        """Yield ``(token ids, text to send, None)`` per generated token, then one
        ``(ids or None, remaining text, finish reason)``; an engine error is raised as
        ``RuntimeError(message, status)``. A stop string ends the request early (it is
        cancelled in the engine) and the text stops before it."""
        decode = self.tokenizer.decoder() if self.tokenizer is not None else None
        filt = _StopFilter(stops)
        while True:
            item = job.tokens.get()
            if isinstance(item, tuple):
                if item[0] == "error":
                    raise RuntimeError(item[1], item[2])
                # bytes of an unfinished last character come out as U+FFFD, as in the
                # whole answer decoded at once (a stop string may still end inside them)
                tail = filt.feed(decode.flush()) if decode else ""
                yield None, tail + filt.flush(), "stop" if filt.hit else item[1]
                return
            text = filt.feed(decode([item])) if decode else ""
            if filt.hit:
                self.loop.cancel(job)
                while not (isinstance(item := job.tokens.get(), tuple)):
                    pass  # tokens made before the cancel arrived: past the stop, dropped
                yield [], text + filt.flush(), "stop"
                return
            yield [item], text, None

    def respond(self, handler: BaseHTTPRequestHandler, job: _Job, prompt_ids: list[int],
                stream: bool, stops: list[str] | None = None) -> None:
        events = self._tokens(job, stops or [])
        if not stream:
            tokens, text, reason = [], "", None
            try:
                for toks, piece, last in events:
                    tokens += toks or []
                    text, reason = text + piece, last
            except RuntimeError as e:
                handler._error(e.args[1], e.args[0])
                return
            body = self._chunk(job.rid, text, tokens, reason)
            body["usage"] = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(tokens),
                             "total_tokens": len(prompt_ids) + len(tokens)}
            handler._send_json(200, body)
            return
        try:
            first = next(events)
        except RuntimeError as e:  # refused before any token (e.g. a prompt too long)
            handler._error(e.args[1], e.args[0])
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        try:
            event = first
            while True:
                toks, piece, reason = event
                handler.wfile.write(
                    f"data: {json.dumps(self._chunk(job.rid, piece, toks or [], reason))}\n\n"
                    .encode())
                handler.wfile.flush()
                if reason is not None:
                    break
                try:
                    event = next(events)
                except RuntimeError as e:
                    err = {"error": {"message": e.args[0], "type": "server_error"}}
                    handler.wfile.write(f"data: {json.dumps(err)}\n\n".encode())
                    break
            handler.wfile.write(b"data: [DONE]\n\n")
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.loop.cancel(job)  # the client went away: free its slot and blocks

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.loop.close()


__all__ = ["BadRequest", "ByteTokenizer", "CompletionServer", "EngineLoop", "tokenizer_for"]
