"""``jds serve``: the OpenAI-compatible server, driven with the real ``openai`` client and raw
sockets (jds/inference/server.py, protocol.py, tokenizer.py).

One server (llama-tiny, byte-level, with a Hugging Face tokenizer folder holding a chat
template and an end-of-sequence id) is shared by the module's tests; the last test shuts it
down gracefully.
"""

from __future__ import annotations

import codecs
import json
import socket
import threading
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jds

openai = pytest.importorskip("openai")
tf = pytest.importorskip("transformers")

SMALL = {"dtype": "float32", "max_tokens": 64, "kv_block_size": 4, "max_batch_tokens": 16,
         "max_seqs": 4}
TEMPLATE = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
            "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
            "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def _byte_level_hf_tokenizer(path, chat_template=None):
    """A Hugging Face byte-level BPE tokenizer (no merges) whose id ``b`` is byte ``b``: the
    byte presets' vocabulary, decoded by ``tokenizers`` (U+FFFD for a broken character)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    rest = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(rest)}
    tok = Tokenizer(models.BPE({char[b]: b for b in range(256)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok)
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from jds.inference.server import CompletionServer
    from jds.inference.tokenizer import HFTokenizer

    model = jds.models.build("llama-tiny", max_position_embeddings=64)  # byte-level, V=256
    engine = jds.init_inference(model, SMALL)
    ref = jds.init_inference(model, SMALL)
    folder = _byte_level_hf_tokenizer(tmp_path_factory.mktemp("tok"), TEMPLATE)
    # the end-of-sequence id: a token greedy decoding of the chat prompt gives after >= 1
    # others (and not before)
    out = ref.generate([list(b"<user>hi<assistant>")], 12)[0]
    eos = next(t for i, t in enumerate(out) if i >= 1 and t not in out[:i])
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    tokenizer = HFTokenizer(folder)
    server = CompletionServer(engine, port=0, model_name="tiny", tokenizer=tokenizer,
                              warm=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none",
                           max_retries=0, timeout=120)
    yield dict(server=server, client=client, engine=engine, ref=ref, model=model,
               folder=folder, eos=eos, thread=thread, url=f"http://127.0.0.1:{server.port}")
    server.shutdown()


def _logprobs(model, ids):
    logits = model(jnp.asarray([ids]))
    return np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), -1))


def test_openai_client_models_completions_chat_n_logprobs(served):
    client, ref, eos = served["client"], served["ref"], served["eos"]
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"

    # completions: the engine's greedy tokens, the text they decode to, usage
    prompt = list(b"def f(x):")
    want = ref.generate([prompt], 6, stop_tokens=[eos])[0]
    r = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=6, temperature=0,
                                  logprobs=2, echo=False)
    c = r.choices[0]
    assert c.model_extra["tokens"] == want
    assert c.text == bytes(want).decode("utf-8", errors="replace")
    assert r.usage.prompt_tokens == 9 and r.usage.completion_tokens == len(want)
    lp = _logprobs(served["model"], prompt + want)
    np.testing.assert_allclose(c.logprobs.token_logprobs,
                               [lp[len(prompt) - 1 + i, t] for i, t in enumerate(want)],
                               atol=1e-4)
    assert all(len(t) == 2 for t in c.logprobs.top_logprobs)
    full = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=8,
                                     temperature=0).choices[0].text
    stop = full[2:4]  # a stop string: the text ends before it, the request is cancelled
    for stream in (False, True):
        r = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=8,
                                      temperature=0, stop=[stop], stream=stream)
        chunks = list(r) if stream else [r]
        assert "".join(ch.choices[0].text for ch in chunks) == full[:full.index(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"
    biased = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=2,
                                       temperature=0, logit_bias={str(want[0]): -100},
                                       frequency_penalty=1.0, presence_penalty=0.5)
    assert biased.choices[0].model_extra["tokens"][0] != want[0]  # sampling.py: parity tests
    echoed = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=6,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text == "def f(x):" + c.text

    # chat: the folder's template (as transformers renders it), stopped at its EOS id
    messages = [{"role": "user", "content": "hi"}]
    ids = tf.AutoTokenizer.from_pretrained(served["folder"]).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    assert ids == list(b"<user>hi<assistant>")
    want = ref.generate([ids], 20, stop_tokens=[eos])[0]
    assert want[-1] == eos and 2 <= len(want) < 12
    hits = served["engine"].scheduler.prefix_hit_tokens
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, n=2,
                                       logprobs=True, top_logprobs=3)
    # choice 1 started after choice 0's prompt was cached: it shared its 4 full blocks
    assert served["engine"].scheduler.prefix_hit_tokens - hits == 16
    text = bytes(want).decode("utf-8", errors="replace")
    assert [ch.message.content for ch in r.choices] == [text, text]
    assert [ch.finish_reason for ch in r.choices] == ["stop", "stop"]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 2 * len(want)
    lp = _logprobs(served["model"], ids + want)
    got = r.choices[1].logprobs.content
    np.testing.assert_allclose([x.logprob for x in got],
                               [lp[len(ids) - 1 + i, t] for i, t in enumerate(want)], atol=1e-4)
    assert len(got[0].top_logprobs) == 3 and got[0].top_logprobs[0].logprob == got[0].logprob

    # streamed: deltas join into the same text, then a usage chunk
    stream = client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)

    # refusals: a 400 naming the field; the server keeps serving
    for kwargs, field in [(dict(frequency_penalty=3.0), "frequency_penalty"),
                          (dict(logit_bias={"x": 1}), "logit_bias"),
                          (dict(max_tokens=64), "context of 64 tokens"),
                          (dict(tools=[{"type": "function", "function": {"name": "f"}}]),
                           "tools"),
                          (dict(extra_body={"nonsense": 1}), "nonsense")]:
        with pytest.raises(openai.BadRequestError, match=field):
            client.chat.completions.create(model="tiny", messages=messages, **kwargs)
    with pytest.raises(openai.BadRequestError, match="unknown role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "tool", "content": "x",
                                                                "tool_call_id": "1"}])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=messages)
    assert client.chat.completions.create(model="tiny", messages=messages, temperature=0
                                          ).choices[0].message.content == text


def test_concurrent_streams_equal_sequential_and_no_leaked_blocks(served):
    """8 greedy streams at once give what each gives alone (continuous batching changes
    nothing), then a few hundred short requests on loopback all succeed and every KV block
    comes back."""
    from concurrent.futures import ThreadPoolExecutor

    client, engine = served["client"], served["engine"]
    prompts = [f"prompt {i}: " + "ab" * i for i in range(8)]

    def stream(p):
        out = client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0,
                                        stream=True)
        return [t for ch in out for t in ch.choices[0].model_extra["tokens"]]

    alone = [stream(p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(stream, prompts))
    assert together == alone

    def short(i):
        return client.completions.create(model="tiny", prompt=[1 + i % 200, 2], max_tokens=2,
                                         temperature=0.7, seed=i).choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        reasons = list(pool.map(short, range(240)))
    assert reasons.count("length") + reasons.count("stop") == 240
    assert engine.allocator.num_free == engine.allocator.capacity
    metrics = urllib.request.urlopen(served["url"] + "/metrics", timeout=30).read().decode()
    assert 'jds_requests_total{endpoint="completions",status="200"}' in metrics
    assert "jds_time_to_first_token_seconds_count" in metrics
    assert "jds_kv_cache_usage_ratio 0.0" in metrics
    assert "jds_prefix_cache_hit_tokens_total" in metrics


def _raw(port, data, timeout=10):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(data)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    finally:
        s.close()
    return int(out.split(b" ", 2)[1]), out


def test_malformed_traffic_gets_4xx_and_the_server_keeps_serving(served):
    server = served["server"]
    port, old = server.port, (server.read_timeout, server.max_body_bytes)
    server.read_timeout, server.max_body_bytes = 1.0, 1 << 20
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    deep = b"[" * 10000 + b"]" * 10000
    try:
        cases = [(head + b"Content-Length: abc\r\n\r\n{}", 400),
                 (head + b"Content-Length: -5\r\n\r\n{}", 400),
                 (head + b"Content-Length: %d\r\n\r\n" % len(deep) + deep, 400),
                 (head + b"Content-Length: %d\r\n\r\nxx" % (10 << 20), 413),
                 (head + b'Content-Length: 100\r\n\r\n{"prompt": "ab', 408),  # stalls
                 (head + b"Content-Length: 2\r\n\r\n{}", 400),
                 (b"GET /v2/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404)]
        for data, status in cases:
            got, body = _raw(port, data)
            assert got == status, (data[:120], body[-300:])
        with socket.socket() as s:  # half a request, then gone: nothing held
            s.connect(("127.0.0.1", port))
            s.sendall(head + b"Content-Length: 50\r\n\r\n{")
        r = served["client"].completions.create(model="tiny", prompt="x", max_tokens=2)
        assert r.choices[0].finish_reason in ("length", "stop")
    finally:
        server.read_timeout, server.max_body_bytes = old


def test_api_key_bounded_queue_and_request_timeout(served):
    server, client, engine = served["server"], served["client"], served["engine"]
    server.api_key = "sekret"
    try:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        ok = openai.OpenAI(base_url=client.base_url, api_key="sekret", max_retries=0)
        assert ok.models.list().data[0].id == "tiny"
        health = urllib.request.urlopen(served["url"] + "/health", timeout=30)
        assert json.loads(health.read())["status"] == "ok"  # no key needed
    finally:
        server.api_key = None
    server.max_queue = 0  # room for max_seqs (4) requests: 5 choices do not fit
    try:
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="tiny", prompt="x", n=5, max_tokens=2)
        assert e.value.status_code == 503 and "capacity" in str(e.value)
    finally:
        server.max_queue = 256
    server.request_timeout = 0.001
    try:
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="tiny", prompt="x" * 30, max_tokens=30)
        assert e.value.status_code == 504
        with pytest.raises(openai.APIStatusError):  # n=3: two choices wait for the first
            client.completions.create(model="tiny", prompt="x" * 30, max_tokens=30, n=3)
    finally:
        server.request_timeout = 600.0
    r = client.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert r.choices[0].text is not None
    assert engine.allocator.num_free == engine.allocator.capacity
    assert server.in_flight == 0  # every admitted choice was counted out, run or not


def test_streamed_text_equals_the_answer_when_it_ends_mid_character(tmp_path):
    """An answer whose last bytes are an unfinished UTF-8 character ends in U+FFFD, streamed
    or not, with the byte tokenizer and a Hugging Face one: the decoder's held-back bytes are
    flushed at the end of the request."""
    from jds.inference.server import CompletionServer
    from jds.inference.tokenizer import ByteTokenizer, HFTokenizer

    model = jds.models.build("llama-tiny", max_position_embeddings=64)  # byte-level, V=256
    engine = jds.init_inference(model, SMALL)
    prompt = list(b"def f(x):")
    want = engine.generate([prompt], 16)[0]
    n = None
    for i in range(1, len(want) + 1):  # the longest prefix ending inside a character
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        dec.decode(bytes(want[:i]))
        n = i if dec.getstate()[0] else n
    assert n is not None, f"greedy answer {want} never stops mid-character; change the prompt"
    full = bytes(want[:n]).decode("utf-8", errors="replace")
    assert full.endswith("\ufffd")
    hf = HFTokenizer(_byte_level_hf_tokenizer(tmp_path / "tok"))
    assert hf.encode("def f(x):") == prompt

    for tokenizer in (ByteTokenizer(), hf):
        server = CompletionServer(engine, port=0, tokenizer=tokenizer, warm=False)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x",
                               max_retries=0, timeout=120)
        try:
            texts = []
            for stream in (False, True):
                r = client.completions.create(model="jds", prompt="def f(x):", max_tokens=n,
                                              temperature=0, stream=stream)
                if stream:
                    chunks = list(r)
                    assert [t for c in chunks for t in c.choices[0].model_extra["tokens"]
                            ] == want[:n]
                    texts.append("".join(c.choices[0].text for c in chunks))
                else:
                    texts.append(r.choices[0].text)
            assert texts == [full, full], (type(tokenizer).__name__, texts, full)
        finally:
            server.shutdown()


def test_shutdown_finishes_the_stream_in_flight(served):
    """Graceful shutdown (what SIGTERM does): the stream in flight runs to its end and
    [DONE], new connections are refused, the engine thread stops. Runs last: it ends the
    module's server."""
    server = served["server"]
    req = urllib.request.Request(served["url"] + "/v1/completions", method="POST",
                                 data=json.dumps({"prompt": "x", "max_tokens": 40,
                                                  "temperature": 0, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        first = r.readline()
        assert first.startswith(b"data: {")
        stopper = threading.Thread(target=server.shutdown)
        stopper.start()
        rest = r.read().decode()
    stopper.join(120)
    events = [x for x in (first.decode() + rest).splitlines() if x.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    tokens = [t for e in events[:-1] for t in json.loads(e[6:])["choices"][0]["tokens"]]
    reason = json.loads(events[-2][6:])["choices"][0]["finish_reason"]
    assert (len(tokens), reason) == (40, "length") or reason == "stop"  # not cut short
    assert not served["thread"].is_alive()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(served["url"] + "/health", timeout=5)


@pytest.mark.slow  # a fresh process: ~15 s
def test_sigterm_lets_the_stream_in_flight_finish(tmp_path):
    """``jds serve`` under SIGTERM: stops accepting, the stream in flight runs to [DONE],
    the process exits 0."""
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "jds", "serve", "llama-tiny", "--port", "0",
                             "--warmup", "none", "--max-tokens", "256"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, JDS_COMPILATION_CACHE="0"))
    try:
        for line in proc.stdout:
            if "http://" in line:
                url = "http://" + line.split("http://", 1)[1].split("/v1", 1)[0]
                break
        req = urllib.request.Request(url + "/v1/completions", method="POST",
                                     data=json.dumps({"prompt": [1, 2], "max_tokens": 200,
                                                      "temperature": 0, "stream": True,
                                                      "stop_token_ids": []}).encode())
        with urllib.request.urlopen(req, timeout=120) as r:
            first = r.readline()
            proc.send_signal(signal.SIGTERM)
            rest = r.read().decode()
        events = [x for x in (first.decode() + rest).splitlines() if x.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        tokens = [t for e in events[:-1] for t in json.loads(e[6:])["choices"][0]["tokens"]]
        assert len(tokens) == 200
        assert proc.wait(60) == 0
    finally:
        proc.kill()
