"""Inference engine: greedy generation vs ``transformers``, tensor parallelism, paged KV
cache bookkeeping, continuous batching with SplitFuse, int8 weights, sampling, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jds
from jds.config import ConfigError
from jds.inference import BlockAllocator, CacheFullError, Request, Scheduler
from jds.inference.kv_cache import paged_attention_reference

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

V = 96  # divides over 1, 2 and 4 tensor-parallel ranks
LLAMA = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
             eos_token_id=None, bos_token_id=None)
GPT2 = dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
            eos_token_id=None, bos_token_id=None)
PROMPTS = [[5, 17, 3, 88, 40, 2, 9], [60], list(np.random.default_rng(1).integers(0, V, 37))]
SMALL = {"dtype": "float32", "max_tokens": 64, "kv_block_size": 4, "max_batch_tokens": 16,
         "max_seqs": 4}


def _hf(family: str, tmp_path):
    torch.manual_seed(0)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA)).eval()
    else:
        model = tf.GPT2LMHeadModel(tf.GPT2Config(**GPT2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def _hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def hf_pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = _hf(request.param, path)
    return path, [_hf_greedy(model, p, 12) for p in PROMPTS]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_greedy_generate_equals_transformers(hf_pair, tp):
    path, want = hf_pair
    engine = jds.init_inference(str(path), {**SMALL, "tensor_parallel": {"tp_size": tp}})
    assert dict(engine.mesh.shape)["tensor"] == tp
    wq = engine.params["layers"]["wq"]
    assert {s.data.shape[2] for s in wq.addressable_shards} == {wq.shape[2] // tp}
    assert engine.generate(PROMPTS, 12) == want
    assert engine.allocator.num_free == engine.allocator.capacity  # every block came back


def test_continuous_batching_equals_each_request_alone():
    model = jds.models.build("llama-tiny", vocab_size=V, max_position_embeddings=64)
    alone = jds.init_inference(model, SMALL)
    requests = [([1, 2, 3], 9), (list(range(40, 70)), 6), ([7] * 11, 12), ([90, 3], 3)]
    want = [alone.generate([p], n)[0] for p, n in requests]

    engine = jds.init_inference(model, SMALL)
    got: dict[int, list[int]] = {}
    rid = {0: engine.submit(*requests[0])}
    steps = 0
    while len(got) < len(requests):
        if steps == 2:  # arrivals while the first request is decoding
            rid[1] = engine.submit(*requests[1])
            rid[2] = engine.submit(*requests[2])
        if steps == 5:
            rid[3] = engine.submit(*requests[3])
        for r, _, done in engine.step():
            if done:
                got[r] = engine.result(r).output
        steps += 1
        assert steps < 100
    assert [got[rid[i]] for i in range(len(requests))] == want
    # a 30-token prompt cannot fit a 16-token pass: SplitFuse split it over passes
    assert engine.allocator.num_free == engine.allocator.capacity
    assert engine.scheduler.idle and not engine.allocator.sequences()


def test_penalties_logit_bias_and_logprobs_match_a_full_forward_reference():
    """OpenAI's presence / frequency penalties and logit bias (sampling.py), greedy, batched
    with a plain request and through multi-step decoding, give the tokens a loop of full
    forward passes gives with the penalties applied on the host; the log-probabilities are
    the model's own."""
    model = jds.models.build("llama-tiny", max_position_embeddings=64)
    engine = jds.init_inference(model, SMALL)
    prompt, n = list(b"def f(x):"), 10
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))  # causal: pad at the end

    def reference(pres=0.0, freq=0.0, bias=None):
        seq, out, logp = list(prompt), [], []
        for _ in range(n):
            ids = np.zeros((1, 32), np.int32)
            ids[0, :len(seq)] = seq
            logits = np.asarray(forward(state, ids)[0, len(seq) - 1], np.float64)
            logp.append(logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max())
            c = np.bincount(out, minlength=logits.shape[0])
            logits = logits - freq * c - pres * (c > 0)
            for t, v in (bias or {}).items():
                logits[t] += v
            out.append(int(np.argmax(logits)))
            seq.append(out[-1])
        return out, [lp[t] for lp, t in zip(logp, out, strict=True)]

    plain, _ = reference()
    cases = [dict(freq=1.5), dict(pres=2.0), dict(bias={plain[0]: -100, 65: 5.0}),
             dict(pres=-1.0, freq=0.5)]
    rids = [engine.submit(prompt, n, presence_penalty=c.get("pres", 0), logprobs=2,
                          frequency_penalty=c.get("freq", 0), logit_bias=c.get("bias"))
            for c in cases]
    r0 = engine.submit(prompt, n)
    while any(engine.result(r).finish_reason is None for r in [*rids, r0]):
        engine.step()
    assert engine.result(r0).output == plain
    for case, rid in zip(cases, rids, strict=True):
        want, want_lp = reference(case.get("pres", 0), case.get("freq", 0), case.get("bias"))
        assert engine.result(rid).output == want, case
        np.testing.assert_allclose([c for c, _ in engine.result(rid).token_logprobs], want_lp,
                                   atol=1e-4)
    assert len({tuple(engine.result(r).output) for r in rids}) > 2  # they did change things
    with pytest.raises(ValueError, match="logit_bias"):
        engine.submit(prompt, 2, logit_bias={999: 1.0})
    with pytest.raises(ValueError, match="presence_penalty"):
        engine.submit(prompt, 2, presence_penalty=3.0)


def test_multi_step_decoding_equals_one_step_at_a_time():
    """decode_steps=4 (several passes per call, tokens fed back on the device) gives what
    one pass per call gives: greedy with a stop token, seeded sampling, uneven lengths."""
    model = jds.models.build("llama-tiny", vocab_size=V, max_position_embeddings=64)
    prompts = [[5, 17, 3], [60, 2], [9] * 6]
    one = jds.init_inference(model, {**SMALL, "decode_steps": 1})
    many = jds.init_inference(model, {**SMALL, "decode_steps": 4})
    greedy = one.generate(prompts, 11)
    stop = greedy[1][5]  # ends the second request after its 6th token
    for kwargs in ({}, {"stop_tokens": [stop]}, {"temperature": 0.9, "top_k": 20, "seed": 3}):
        want = one.generate(prompts, 11, **kwargs)
        assert many.generate(prompts, 11, **kwargs) == want, kwargs
    assert len(want[0]) == 11 and many.allocator.num_free == many.allocator.capacity
    # It ran: every request past its prompt went four steps per call.
    calls = 0
    rids = [many.submit(p, 9) for p in prompts]
    while any(many.result(r).finish_reason is None for r in rids):
        many.step()
        calls += 1
    assert calls <= 1 + 2 + 1  # prefill, two 4-step calls, the last token


def test_warmup_compiles_every_pass_so_serving_compiles_nothing():
    model = jds.models.build("llama-tiny", vocab_size=V, max_position_embeddings=64)
    engine = jds.init_inference(model, SMALL)  # 16 tokens per pass, 16 blocks per sequence
    assert engine.warmup() == 1 * 3 + 3  # one tokens bucket x 3 widths, multi-step x 3
    compiled = engine._step._cache_size(), engine._decode._cache_size()
    assert engine.allocator.num_free == engine.allocator.capacity
    engine.generate([PROMPTS[2], PROMPTS[0], [1] * 30], 20)
    assert (engine._step._cache_size(), engine._decode._cache_size()) == compiled


def test_splitfuse_packs_decodes_first_then_prompt_chunks():
    alloc = BlockAllocator(num_blocks=20, block_size=4)
    s = Scheduler(alloc, max_seqs=3, max_batch_tokens=8)
    a = Request(rid=0, prompt=[1] * 5, max_new_tokens=4, limit=64)
    b = Request(rid=1, prompt=[2] * 13, max_new_tokens=4, limit=64)
    s.add(a)
    s.add(b)
    w = s.plan()  # a's whole prompt, then 3 tokens of b
    assert [(x.request.rid, x.start, x.stop) for x in w] == [(0, 0, 5), (1, 0, 3)]
    assert w[0].sample and not w[1].sample
    for x in w:
        x.request.cached = x.stop
    a.output.append(7)  # a now decodes: one token first, then b's next chunk
    w = s.plan()
    assert [(x.request.rid, x.start, x.stop) for x in w] == [(0, 5, 6), (1, 3, 10)]
    assert alloc.table(1) == alloc.table(1)[:3] and len(alloc.table(1)) == 3
    s.finish(a, "stop")
    s.finish(b, "stop")
    assert alloc.num_free == alloc.capacity and s.idle


def test_block_allocator_grows_frees_and_refuses_when_full():
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    assert alloc.grow(7, 3) == [1, 2] and alloc.num_free == 1
    with pytest.raises(CacheFullError, match="needs 2 more KV blocks"):
        alloc.grow(8, 4)
    assert alloc.table(8) == [] and alloc.num_free == 1  # nothing taken
    alloc.free(7)
    assert alloc.num_free == alloc.capacity == 3


def test_prefix_blocks_are_shared_cached_when_idle_and_evicted_last():
    from jds.inference.kv_cache import prefix_keys

    alloc = BlockAllocator(num_blocks=5, block_size=2)  # 4 usable blocks
    keys = prefix_keys([1, 2, 3, 4, 5], 2, 2)
    assert keys == prefix_keys([1, 2, 3, 4, 9], 2, 2) != prefix_keys([1, 2, 3, 5], 2, 2)
    assert alloc.grow(1, 4) == [1, 2]
    alloc.publish(1, 0, keys[0])
    alloc.publish(1, 1, keys[1])
    assert alloc.cached_prefix(keys) == [1, 2]
    alloc.share(2, [1, 2])
    assert alloc.grow(2, 6) == [1, 2, 3] and alloc.num_free == 1
    alloc.free(1)  # still held by sequence 2
    assert alloc.num_free == 1 and alloc.cached_prefix(keys) == [1, 2]
    alloc.free(2)  # 3 goes back; 1 and 2 stay cached, idle, and count as free
    assert alloc.num_free == 4 and alloc.idle_count([1, 2]) == 2
    alloc.share(3, alloc.cached_prefix(keys[:1]))
    assert alloc.table(3) == [1] and alloc.num_free == 3
    alloc.free(3)
    assert alloc.grow(4, 8) == [3, 4, 2, 1]  # free blocks first, then the idle ones, LRU first
    assert alloc.cached_prefix(keys) == [] and alloc.num_free == 0
    alloc.free(4)
    assert alloc.num_free == alloc.capacity


def test_prefix_caching_reuses_a_computed_prompt_prefix():
    """A prompt starting with blocks an earlier request computed starts its prefill after
    them, and generates what an engine without prefix caching generates."""
    model = jds.models.build("llama-tiny", vocab_size=V, max_position_embeddings=64)
    off = jds.init_inference(model, {**SMALL, "prefix_caching": False})
    on = jds.init_inference(model, SMALL)  # 4-token blocks
    system = list(range(1, 29))  # 28 tokens: 7 blocks
    prompts = [system + [40, 41, 42, 43], system + [50, 51, 52], system[:13] + [60]]
    want = [off.generate([p], 6)[0] for p in prompts]
    starts = []
    batch = on._batch
    on._batch = lambda work, *a, **k: (  # record where each request's first pass starts
        starts.extend((w.request.rid, w.start) for w in work), batch(work, *a, **k))[1]
    got = [on.generate([p], 6)[0] for p in prompts]
    assert got == want
    first = {}
    for rid, start in starts:
        first.setdefault(rid, start)
    # The first prompt computes everything; the second reuses its 7 blocks (28 tokens); the
    # third its first 3 (12 of 13 shared tokens: a block is shared only whole).
    assert list(first.values()) == [0, 28, 12]
    # A chat's next turn: the first turn's prompt and answer (generated blocks too) are
    # cached; 32 + 6 tokens, 37 of them written, give 9 whole blocks.
    turn2 = prompts[0] + got[0] + [70, 71]
    starts.clear()
    assert on.generate([turn2], 4) == off.generate([turn2], 4)
    assert starts[0][1] == 36
    assert on.allocator.num_free == on.allocator.capacity and not on.allocator.sequences()


def test_paged_attention_matches_dense_causal_attention():
    rng = np.random.default_rng(0)
    T, Q, K, H, bs = 10, 4, 2, 8, 4
    q, k, v = (rng.standard_normal((T, n, H)).astype(np.float32) for n in (Q, K, K))
    table = np.array([3, 1, 5])  # blocks scattered through the pool
    pages_k = np.zeros((6, bs, K, H), np.float32)
    pages_v = np.zeros((6, bs, K, H), np.float32)
    for t in range(T):
        pages_k[table[t // bs], t % bs], pages_v[table[t // bs], t % bs] = k[t], v[t]
    got = paged_attention_reference(q, pages_k, pages_v, np.tile(table, (T, 1)), np.arange(T))
    from jds.kernels.attention.reference import attention_reference
    want = attention_reference(q[None], k[None], v[None], causal=True)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_int8_weights_take_half_the_bytes_and_agree_with_bf16(trained_tiny):
    model, prompts = trained_tiny
    cfg = {**SMALL, "max_seqs": 8, "max_tokens": 96}
    bf16 = jds.init_inference(model, {**cfg, "dtype": "bfloat16"})
    int8 = jds.init_inference(model, {**cfg, "dtype": "int8"})
    b, q = bf16.weight_bytes(), int8.weight_bytes()
    assert q["layers"] <= 0.55 * b["layers"]
    assert q["other"] == b["other"]  # embeddings, norms and head stay bf16
    x, y = bf16.generate(prompts, 16), int8.generate(prompts, 16)
    agree = np.mean([a == c for s, t in zip(x, y, strict=True) for a, c in zip(s, t, strict=True)])
    assert agree >= 0.8, agree
    # Tensor-parallel int8 multiplies each device's weight shard (layers.dense's shard_map).
    tp2 = jds.init_inference(model, {**cfg, "dtype": "int8", "tensor_parallel": {"tp_size": 2}})
    z = tp2.generate(prompts, 16)
    same = np.mean([a == c for s, t in zip(y, z, strict=True) for a, c in zip(s, t, strict=True)])
    assert same >= 0.95, same


@pytest.fixture(scope="module")
def trained_tiny():
    """llama-tiny trained briefly on the embedded corpus (bytes), and byte prompts from it."""
    from jds.data import embedded_corpus

    data = np.asarray(embedded_corpus()[0][:2_000_000], np.int32)
    engine = jds.initialize(
        jds.models.build("llama-tiny", max_position_embeddings=96),
        {"train_batch_size": 16, "optimizer": {"type": "adamw", "params": {"lr": 3e-3}}})
    rng = np.random.default_rng(0)
    for _ in range(40):
        starts = rng.integers(0, len(data) - 65, 16)
        engine.train_batch({"input_ids": np.stack([data[s:s + 64] for s in starts])})
    prompts = [data[s:s + 24].tolist() for s in rng.integers(0, len(data) - 25, 8)]
    return engine.model, prompts


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = jds.models.build("llama-tiny", vocab_size=V, max_position_embeddings=64)
    engine = jds.init_inference(model, SMALL)
    greedy = engine.generate(PROMPTS[:2], 8)
    assert engine.generate(PROMPTS[:2], 8, temperature=1.0, top_k=1) == greedy
    assert engine.generate(PROMPTS[:2], 8, temperature=0.7, top_p=1e-6) == greedy
    a = engine.generate(PROMPTS[:2], 8, temperature=1.5, seed=3)
    assert engine.generate(PROMPTS[:2], 8, temperature=1.5, seed=3) == a
    assert engine.generate(PROMPTS[:2], 8, temperature=1.5, seed=4) != a
    stop = greedy[0][2]
    out = engine.generate(PROMPTS[:1], 8, stop_tokens=[stop])[0]
    assert out == greedy[0][:greedy[0].index(stop) + 1]


def test_bad_config_and_requests_are_clear_errors():
    model = jds.models.build("llama-tiny", vocab_size=V, max_position_embeddings=64)
    with pytest.raises(ConfigError, match="dtype 'fp8'"):
        jds.init_inference(model, {"dtype": "fp8"})
    with pytest.raises(ConfigError, match="tp_size=16 but only 8 devices"):
        jds.init_inference(model, {"tensor_parallel": {"tp_size": 16}})
    with pytest.raises(ConfigError, match="max_seqz"):
        jds.init_inference(model, {"max_seqz": 4})
    engine = jds.init_inference(model, SMALL)
    with pytest.raises(ValueError, match="vocab_size is 96"):
        engine.submit([5, 400])
    with pytest.raises(ValueError, match="leaves no room"):
        engine.submit([1] * 64)
    with pytest.raises(ValueError, match="top_p must be in"):
        engine.submit([1], top_p=0.0)


@pytest.mark.parametrize("impl,tp", [
    ("pallas_interpret", 1), ("pallas_interpret", 2),
    # 21 s; the TPU kernel matches the reference by default (test_tpu_paged_attention_kernel_*)
    pytest.param("pallas_tpu_interpret", 2, marks=pytest.mark.slow)])
def test_pallas_paged_attention_kernel_serves_the_same_tokens(impl, tp):
    from jds.kernels.attention.paged import paged_attention

    rng = np.random.default_rng(0)
    q = rng.standard_normal((6, 4, 8)).astype(np.float32)
    kp, vp = (rng.standard_normal((9, 4, 2, 8)).astype(np.float32) for _ in range(2))
    tables = rng.integers(1, 9, (6, 3)).astype(np.int32)
    pos = np.array([0, 3, 4, 7, 11, 5], np.int32)
    np.testing.assert_allclose(
        np.asarray(paged_attention(q, kp, vp, tables, pos, interpret=True)),
        np.asarray(paged_attention_reference(q, kp, vp, tables, pos)), atol=1e-5)

    model = jds.models.build("llama-tiny", vocab_size=V, max_position_embeddings=64)
    cfg = {**SMALL, "max_seqs": 2, "max_batch_tokens": 8, "tensor_parallel": {"tp_size": tp}}
    want = jds.init_inference(model, cfg).generate(PROMPTS[:2], 5)
    got = jds.init_inference(model, {**cfg, "attention": impl}).generate(PROMPTS[:2], 5)
    assert got == want


@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
def test_tpu_paged_attention_kernel_matches_the_reference(dtype):
    """The Mosaic kernel (TPU interpret mode: its DMAs and semaphores simulated) over the
    engine's stacked cache: GQA, MHA and a group of 3, blocks scattered, any position."""
    import jax.numpy as jnp

    from jds.kernels.attention.paged_tpu import paged_attention_tpu

    rng = np.random.default_rng(0)
    for Q, K in ((4, 2), (8, 8), (12, 4)):
        q = jnp.asarray(rng.standard_normal((6, Q, 16)), dtype)
        kp, vp = (jnp.asarray(rng.standard_normal((2, 9, 8, K, 16)), dtype) for _ in range(2))
        tables = rng.integers(1, 9, (6, 3)).astype(np.int32)
        pos = np.array([0, 3, 8, 17, 23, 5], np.int32)
        got = paged_attention_tpu(q, kp, vp, tables, pos, layer=1, interpret=True)
        want = paged_attention_reference(q, kp, vp, tables, pos, layer=1)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=1e-5 if dtype == np.float32 else 2e-2)


def test_serves_a_jds_training_checkpoint(tmp_path):
    model = jds.models.build("llama-tiny", vocab_size=V, max_position_embeddings=64)
    engine = jds.initialize(model, {"train_batch_size": 8})
    engine.train_batch({"input_ids": np.random.default_rng(0).integers(0, V, (8, 16))})
    engine.save_checkpoint(tmp_path / "checkpoints")
    engine.close()
    want = jds.init_inference(engine.model, SMALL).generate(PROMPTS[:2], 6)
    assert jds.init_inference(str(tmp_path), SMALL).generate(PROMPTS[:2], 6) == want


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA device")
def test_gpu_pallas_paged_attention_serves_the_same_tokens():
    model = jds.models.build("llama-tiny", vocab_size=V, max_position_embeddings=64)
    cfg = {**SMALL, "max_seqs": 2, "max_batch_tokens": 8, "dtype": "float32"}
    want = jds.init_inference(model, cfg).generate(PROMPTS[:2], 5)
    assert jds.init_inference(model, {**cfg, "attention": "pallas"}).generate(
        PROMPTS[:2], 5) == want


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_forward_pass_never_copies_the_kv_cache(dtype):
    """The cache is a loop carry written in place: a pass's temporaries stay far below the
    cache's size (before, each layer's pages were sliced out and stacked back, and on CPU
    a bf16 scatter widened the whole cache to f32: temps of 0.6x and 2.8x the cache)."""
    engine = jds.init_inference("llama-tiny", {"dtype": dtype, "max_seqs": 8,
                                               "max_tokens": 512, "num_kv_blocks": 2049})
    if dtype == "bfloat16":  # XLA:CPU has no bf16 scatter: the bits are stored as uint16
        assert engine.k_pages.dtype == np.uint16
    cache = engine.k_pages.nbytes + engine.v_pages.nbytes
    temp = engine.lower_step(1).compile().memory_analysis().temp_size_in_bytes
    assert temp < cache / 4, (temp, cache)


def test_bf16_cache_bits_read_the_same_by_the_kernel_and_the_reference():
    import jax.numpy as jnp

    from jds.inference.kv_cache import storage_dtype, write_pages

    assert storage_dtype(jnp.bfloat16, "cpu") == jnp.uint16
    assert storage_dtype(jnp.bfloat16, "gpu") == jnp.bfloat16
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((6, 4, 8)), jnp.bfloat16)
    kv = jnp.asarray(rng.standard_normal((6, 2, 8)), jnp.bfloat16)
    blocks, offsets = jnp.asarray([1, 1, 1, 1, 2, 2]), jnp.asarray([0, 1, 2, 3, 0, 1])
    tables, pos = np.tile([1, 2], (6, 1)), np.arange(6)
    bf16 = write_pages(jnp.zeros((3, 4, 2, 8), jnp.bfloat16), kv, blocks, offsets)
    bits = write_pages(jnp.zeros((3, 4, 2, 8), jnp.uint16), kv, blocks, offsets)
    np.testing.assert_array_equal(np.asarray(jax.lax.bitcast_convert_type(bits, jnp.bfloat16),
                                             np.float32), np.asarray(bf16, np.float32))
    np.testing.assert_array_equal(
        np.asarray(paged_attention_reference(q, bits, bits, tables, pos), np.float32),
        np.asarray(paged_attention_reference(q, bf16, bf16, tables, pos), np.float32))

    model = jds.models.build("llama-tiny", vocab_size=V, max_position_embeddings=64)
    cfg = {**SMALL, "dtype": "bfloat16", "max_seqs": 2, "max_batch_tokens": 8}
    want = jds.init_inference(model, cfg).generate(PROMPTS[:2], 5)
    got = jds.init_inference(model, {**cfg, "attention": "pallas_interpret"}).generate(
        PROMPTS[:2], 5)
    assert got == want


def test_dtype_auto_serves_the_checkpoints_own_dtype(tmp_path):
    """jds serve's default --dtype auto: a Hugging Face folder's torch_dtype (float32 when it
    names none), a module's parameters' dtype."""
    import json

    from jds.inference.engine import source_dtype

    for written, want in (({"torch_dtype": "bfloat16"}, "bfloat16"),
                          ({"dtype": "float16"}, "float16"), ({}, "float32")):
        d = tmp_path / want
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "llama", **written}))
        assert source_dtype(d) == want
    assert source_dtype("llama-tiny") == "float32"
    engine = jds.init_inference(jds.models.build("llama-tiny"), {"dtype": "auto",
                                                                 "max_tokens": 32})
    assert engine.dtype_name == "float32" and engine.dtype == jnp.float32
