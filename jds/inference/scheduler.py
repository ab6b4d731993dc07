"""Continuous batching with Dynamic SplitFuse (DeepSpeed-FastGen's policy), host side.

Every forward pass gets a token budget (``max_batch_tokens``). ``Scheduler.plan`` fills it
in this order:

1. one token for every sequence that is decoding (its last generated token);
2. the next chunk of every sequence whose prompt is partly processed;
3. new requests, in arrival order, while a sequence slot and KV blocks are free — their
   prompt split into chunks that fit what is left of the budget.

So a long prompt never stalls the running decodes (it is split over several passes and
fused with them), and every pass does a steady amount of work. A request reserves the KV
blocks for its whole length (prompt plus ``max_new_tokens``, capped at the model's
positions) when it is admitted, so a running sequence can never run out of cache; blocks
are handed out as it grows and all come back when it ends. With prefix caching, an admitted
prompt whose first blocks were computed before (and published) shares those blocks and
starts its prefill after them.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math

from jds.inference.kv_cache import BlockAllocator, prefix_keys


@dataclasses.dataclass
class Request:
    """One generation request and its progress.

    Attributes:
      rid: request id (``engine.submit`` returns it).
      prompt: prompt token ids.
      max_new_tokens: tokens to generate at most.
      temperature, top_k, top_p, seed: sampling (temperature 0 = greedy).
      stop_tokens: generation ends after emitting one of these (it is included).
      limit: the sequence's maximum total length (model positions / ``max_tokens``).
      slot: the batch row it holds while running.
      cached: tokens whose K/V are in the cache.
      output: generated tokens so far.
      finish_reason: None while running; ``"stop"`` or ``"length"``.
      prefix_keys: keys of its full blocks (prefix caching): at first the prompt's, looked
        up on admission; extended as its blocks fill.
      published: how many of its blocks it has published.
      logprobs: None, or how many most likely alternatives (0 to ``TOP_LOGPROBS``) to
        record with each generated token's log-probability.
      token_logprobs: one ``(log-probability, [(token id, log-probability), ...])`` per
        generated token when ``logprobs`` is set.
      presence_penalty, frequency_penalty, logit_bias: OpenAI's logit adjustments.
      sampling_row: whether its slot's sampling state (counts, bias) was set up.
    """

    rid: int
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop_tokens: frozenset[int] = frozenset()
    limit: int = 0
    slot: int = -1
    cached: int = 0
    output: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    prefix_keys: list[bytes] = dataclasses.field(default_factory=list)
    published: int = 0
    logprobs: int | None = None
    token_logprobs: list[tuple[float, list[tuple[int, float]]]] = dataclasses.field(
        default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)
    sampling_row: bool = False

    @property
    def total(self) -> int:
        """Tokens the sequence will hold at most."""
        return min(len(self.prompt) + self.max_new_tokens, self.limit)

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt)

    def tokens(self) -> list[int]:
        """Prompt and output so far."""
        return self.prompt + self.output


@dataclasses.dataclass(frozen=True)
class Work:
    """A slice of one request in a forward pass: tokens ``[start, stop)`` of its sequence.

    ``sample`` is true when the slice ends at the sequence's newest token, so the pass's
    logits there give the next token.
    """

    request: Request
    start: int
    stop: int

    @property
    def sample(self) -> bool:
        return self.stop == len(self.request.tokens())


class Scheduler:
    """Admission, SplitFuse packing and KV-block bookkeeping for the inference engine."""

    def __init__(self, allocator: BlockAllocator, *, max_seqs: int, max_batch_tokens: int,
                 prefix_caching: bool = False) -> None:
        if max_seqs < 1 or max_batch_tokens < 1:
            raise ValueError(f"max_seqs and max_batch_tokens must be >= 1; got {max_seqs}, "
                             f"{max_batch_tokens}")
        self.allocator = allocator
        self.max_seqs, self.max_batch_tokens = max_seqs, max_batch_tokens
        self.prefix_caching = prefix_caching
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self._reserved = 0  # blocks promised to running requests but not yet handed out
        self.prefix_hit_tokens = 0  # prompt tokens found in the prefix cache (since start)
        self._ids = itertools.count()

    def next_id(self) -> int:
        return next(self._ids)

    def add(self, req: Request) -> None:
        """Queue a request (admitted by ``plan`` when a slot and blocks are free)."""
        need = self._blocks(req.total)
        if need > self.allocator.capacity:
            raise ValueError(f"request {req.rid} needs {need} KV blocks ({req.total} tokens) "
                             f"but the cache has {self.allocator.capacity}; raise "
                             "num_kv_blocks or lower max_new_tokens")
        if self.prefix_caching:
            # At most up to the prompt's last token, which is computed again for its logits.
            bs = self.allocator.block_size
            req.prefix_keys = prefix_keys(req.prompt, bs, (len(req.prompt) - 1) // bs)
        self.waiting.append(req)

    def _blocks(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.allocator.block_size)

    def _admit(self) -> Request | None:
        if not self.waiting or len(self.running) >= self.max_seqs:
            return None
        req = self.waiting[0]
        shared = self.allocator.cached_prefix(req.prefix_keys)
        need = self._blocks(req.total) - len(shared)
        if need + self.allocator.idle_count(shared) > self.allocator.num_free - self._reserved:
            return None
        self.waiting.popleft()
        req.slot = min(set(range(self.max_seqs)) - set(self.running))
        self.running[req.slot] = req
        if shared:  # its first tokens' K/V are in the cache already: start after them
            self.allocator.share(req.rid, shared)
            req.published = len(shared)
            req.cached = len(shared) * self.allocator.block_size
            self.prefix_hit_tokens += req.cached
        self._reserved += need
        return req

    def computed(self, req: Request) -> None:
        """After a pass: publish the blocks of ``req`` whose tokens are all in the cache now,
        generated ones too (a chat's next turn starts with this turn's prompt and answer)."""
        if not self.prefix_caching:
            return
        done = req.cached // self.allocator.block_size
        if done > req.published:
            req.prefix_keys = prefix_keys(req.tokens(), self.allocator.block_size, done,
                                          known=req.prefix_keys)
            for i in range(req.published, done):
                self.allocator.publish(req.rid, i, req.prefix_keys[i])
            req.published = done

    def plan(self) -> list[Work]:
        """The next forward pass: decodes first, then prompt chunks (see module docstring).

        KV blocks for the planned tokens are handed out here.
        """
        budget, work = self.max_batch_tokens, []

        def take(req: Request, n: int) -> None:
            nonlocal budget
            start = req.cached
            stop = start + n
            before = len(self.allocator.table(req.rid))
            self.allocator.grow(req.rid, stop)
            self._reserved -= len(self.allocator.table(req.rid)) - before
            work.append(Work(req, start, stop))
            budget -= n

        for req in sorted(self.running.values(), key=lambda r: r.slot):
            if not req.prefilling and budget > 0:
                take(req, 1)
        for req in sorted(self.running.values(), key=lambda r: r.rid):
            if req.prefilling and budget > 0:
                take(req, min(len(req.prompt) - req.cached, budget))
        while budget > 0 and (req := self._admit()) is not None:
            take(req, min(len(req.prompt) - req.cached, budget))
        return work

    def extend(self, req: Request, n_tokens: int) -> list[int]:
        """Hand ``req`` the blocks for its first ``n_tokens`` tokens out of its reservation
        (multi-step decoding writes several positions per call). Returns its table."""
        if n_tokens > req.total:
            raise ValueError(f"request {req.rid} reserved {req.total} tokens, not {n_tokens}")
        before = len(self.allocator.table(req.rid))
        table = self.allocator.grow(req.rid, n_tokens)
        self._reserved -= len(table) - before
        return table

    def finish(self, req: Request, reason: str) -> None:
        """End a running request: free its slot and every KV block (reserved ones too)."""
        req.finish_reason = reason
        self._reserved -= self._blocks(req.total) - len(self.allocator.table(req.rid))
        self.allocator.free(req.rid)
        self.running.pop(req.slot, None)

    def cancel(self, req: Request) -> None:
        """Stop a request early (client gone, a stop string seen): a waiting one leaves the
        queue, a running one finishes now; either way its blocks come back."""
        if req.finish_reason is not None:
            return
        if req in self.waiting:
            self.waiting.remove(req)
            req.finish_reason = "cancelled"
        else:
            self.finish(req, "cancelled")

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running


__all__ = ["Request", "Scheduler", "Work"]
