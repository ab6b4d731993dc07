"""Paged KV cache: fixed-size blocks, a block table per sequence, attention over the pages.

Device side, the cache is two arrays per model, ``k_pages`` and ``v_pages``, shaped
``[layers, num_blocks, block_size, kv_heads, head_dim]`` (``kv_heads`` split over the
``tensor`` axis under tensor parallelism). Host side, ``BlockAllocator`` hands blocks to
sequences as they grow and takes them back when they end; a sequence's *block table* lists
its blocks in order, so token ``t`` of the sequence lives at
``(table[t // block_size], t % block_size)``.

Block 0 is never handed out: padded tokens of a bucketed batch write their K/V there, so
every write in a step is unconditional (no masked scatter) and never touches a live block.

Prefix caching: a block whose tokens are all computed (prompt or generated) can be
*published* under a key that names its content and everything before it (``prefix_keys``:
a chain of 128-bit BLAKE2b digests over the token ids). A later sequence whose prompt starts
with the same blocks *shares* them (reference-counted) instead of computing them again. When
no sequence holds a published block it stays cached, idle, until a new block is needed and
none is free: then the least recently used idle block is evicted. Idle blocks count as free.

``paged_attention_reference`` is the plain-``jnp`` attention over the pages: each token of
a flat (ragged) batch gathers its own sequence's blocks and attends causally to the
positions up to its own. It is the CPU path and the reference a Pallas paged-attention
kernel (GPU/TPU) must match.
"""

from __future__ import annotations

import collections
import hashlib
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SCRATCH_BLOCK = 0  # padded tokens write here; never allocated to a sequence


class CacheFullError(RuntimeError):
    """The KV cache has too few free blocks for a request (raised by ``BlockAllocator``)."""


class BlockAllocator:
    """Hands out KV-cache blocks to sequences and takes them back.

    Attributes:
      num_blocks: blocks in the cache, scratch block included.
      block_size: tokens per block.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (1 is scratch); got "
                             f"{num_blocks}")
        if block_size < 1:
            raise ValueError(f"kv_block_size must be >= 1; got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))  # pop() gives 1, 2, ...
        self._tables: dict[int, list[int]] = {}
        self._refs: dict[int, int] = {}  # block -> sequences holding it
        self._by_key: dict[bytes, int] = {}  # prefix key -> published block
        self._key: dict[int, bytes] = {}  # published block -> its key
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first

    @property
    def num_free(self) -> int:
        """Blocks no sequence holds (idle cached ones included; the scratch block not)."""
        return len(self._free) + len(self._idle)

    @property
    def capacity(self) -> int:
        """Blocks that can be handed out (all but the scratch block)."""
        return self.num_blocks - 1

    def blocks_needed(self, seq: int, n_tokens: int) -> int:
        """Extra blocks ``seq`` needs to hold ``n_tokens`` tokens in all."""
        have = len(self._tables.get(seq, ()))
        return max(0, math.ceil(n_tokens / self.block_size) - have)

    def can_grow(self, seq: int, n_tokens: int) -> bool:
        """Whether ``grow(seq, n_tokens)`` would succeed."""
        return self.blocks_needed(seq, n_tokens) <= self.num_free

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # evict the least recently used idle cached block
            block, _ = self._idle.popitem(last=False)
            del self._by_key[self._key.pop(block)]
        self._refs[block] = 1
        return block

    def grow(self, seq: int, n_tokens: int) -> list[int]:
        """Make ``seq``'s table long enough for ``n_tokens`` tokens; return the table.

        Raises:
          CacheFullError: not enough free blocks (nothing is taken then).
        """
        need = self.blocks_needed(seq, n_tokens)
        if need > self.num_free:
            raise CacheFullError(f"sequence {seq} needs {need} more KV blocks for {n_tokens} "
                                 f"tokens; {self.num_free} free of {self.capacity}")
        table = self._tables.setdefault(seq, [])
        table.extend(self._take() for _ in range(need))
        return table

    def table(self, seq: int) -> list[int]:
        """``seq``'s blocks in order (empty if it holds none)."""
        return list(self._tables.get(seq, ()))

    def free(self, seq: int) -> None:
        """Let go of every block of ``seq``: a block no other sequence holds goes back to the
        free list, or, if published, stays cached as idle."""
        for block in reversed(self._tables.pop(seq, [])):
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            del self._refs[block]
            if block in self._key:
                self._idle[block] = None
            else:
                self._free.append(block)

    def sequences(self) -> list[int]:
        """Sequences holding blocks."""
        return sorted(self._tables)

    # ------------------------------------------------------------------ prefix caching
    def cached_prefix(self, keys: Sequence[bytes]) -> list[int]:
        """The published blocks of the longest run of ``keys`` from the start."""
        blocks = []
        for key in keys:
            block = self._by_key.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def idle_count(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks`` are idle (sharing them takes them out of the free count)."""
        return sum(b in self._idle for b in blocks)

    def share(self, seq: int, blocks: Sequence[int]) -> None:
        """Start ``seq``'s (empty) table with published ``blocks``, held by it too."""
        if self._tables.get(seq):
            raise ValueError(f"sequence {seq} already holds blocks; share before it grows")
        for block in blocks:
            self._idle.pop(block, None)
            self._refs[block] = self._refs.get(block, 0) + 1
        self._tables[seq] = list(blocks)

    def publish(self, seq: int, index: int, key: bytes) -> None:
        """Make block ``index`` of ``seq`` (all of its tokens computed) findable by ``key``.
        A key already published (the same prefix computed twice) keeps its first block."""
        block = self._tables[seq][index]
        if key not in self._by_key and block not in self._key:
            self._by_key[key], self._key[block] = block, key


def prefix_keys(tokens: Sequence[int], block_size: int, n_blocks: int, *,
                known: Sequence[bytes] = ()) -> list[bytes]:
    """Keys of the first ``n_blocks`` full blocks of ``tokens``: block ``i``'s key digests
    block ``i - 1``'s key and its own token ids, so equal keys mean equal prefixes (128-bit
    BLAKE2b: a collision, which would serve another prefix's K/V, is not a practical risk).
    ``known``: keys of the first blocks, already computed; the chain continues from them."""
    keys = list(known[:n_blocks])
    prev = keys[-1] if keys else b""
    ids = np.asarray(tokens[:n_blocks * block_size], np.int64)
    for i in range(len(keys), n_blocks):
        prev = hashlib.blake2b(prev + ids[i * block_size:(i + 1) * block_size].tobytes(),
                               digest_size=16).digest()
        keys.append(prev)
    return keys


def storage_dtype(dtype: jnp.dtype, platform: str) -> jnp.dtype:
    """The dtype the cache is stored in: ``dtype``, except 2-byte floats on CPU, kept as
    their raw bits in uint16.

    XLA:CPU has no bf16/fp16 scatter: it widens the whole operand to f32 and back around
    every cache write, so a bf16 cache would cost a full pass over it per layer per forward
    pass (measured: 73 ms for a 128 MiB cache vs 0.01 ms for the same scatter on uint16).
    The bits are the same; readers reinterpret them with q's dtype (``from_storage``).
    """
    dtype = jnp.dtype(dtype)
    if platform == "cpu" and jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2:
        return jnp.dtype(jnp.uint16)
    return dtype


def from_storage(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Cache values as ``dtype`` (a bitcast when they are stored as uint16 bits)."""
    if x.dtype == jnp.uint16 and jnp.dtype(dtype) != jnp.uint16:
        return jax.lax.bitcast_convert_type(x, dtype)
    return x


def write_pages(
    pages: jax.Array, x_NKH: jax.Array, block_N: jax.Array, offset_N: jax.Array,
    layer: jax.Array | int | None = None,
) -> jax.Array:
    """Store each token's ``x[n]`` at ``pages[block_N[n], offset_N[n]]``.

    ``pages`` is one layer's ``[blocks, block_size, kv_heads, head_dim]``, or with ``layer``
    the whole stacked cache ``[layers, blocks, ...]``, written at that layer. The stacked
    form is what the engine uses: inside the layer scan the cache is a loop carry updated in
    place, where slicing a layer out and stacking it back would copy the whole cache on every
    forward pass.
    """
    if pages.dtype == jnp.uint16:  # raw bits of a 2-byte float (see storage_dtype)
        if x_NKH.dtype.itemsize != 2:
            raise ValueError(f"a uint16 cache stores 2-byte floats; got {x_NKH.dtype} values")
        x_NKH = jax.lax.bitcast_convert_type(x_NKH, jnp.uint16)
    x_NKH = x_NKH.astype(pages.dtype)
    if layer is None:
        return pages.at[block_N, offset_N].set(x_NKH)
    return pages.at[layer, block_N, offset_N].set(x_NKH)


def paged_attention_reference(
    q_NQH: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    tables_NM: jax.Array,
    positions_N: jax.Array,
    *,
    sm_scale: float | None = None,
    layer: jax.Array | int | None = None,
) -> jax.Array:
    """Causal attention of a flat batch of tokens over their sequences' cached K/V.

    Args:
      q_NQH: queries ``[tokens, heads, head_dim]``.
      k_pages, v_pages: one layer's pages ``[num_blocks, block_size, kv_heads, head_dim]``,
        already holding these tokens' own K/V; with ``layer``, the stacked cache
        ``[layers, num_blocks, ...]`` (only the table's blocks of that layer are read).
        A uint16 cache holds the raw bits of q's dtype (``storage_dtype``).
      tables_NM: each token's sequence block table ``[tokens, max_blocks]`` (unused entries
        may point anywhere; they lie beyond the token's position and are masked).
      positions_N: each token's position in its sequence; it attends to positions
        ``0..positions_N[n]``.
      sm_scale: softmax scale; default ``head_dim ** -0.5``.
      layer: the layer of a stacked cache, or None for one layer's pages.

    Returns:
      ``[tokens, heads, head_dim]`` in q's dtype; softmax in fp32.
    """
    N, Q, H = q_NQH.shape
    bs, K = k_pages.shape[-3:-1]
    M = tables_NM.shape[1]
    scale = H ** -0.5 if sm_scale is None else sm_scale
    if layer is None:
        k_NMSKH, v_NMSKH = k_pages[tables_NM], v_pages[tables_NM]
    else:
        k_NMSKH, v_NMSKH = k_pages[layer, tables_NM], v_pages[layer, tables_NM]
    k_NMSKH, v_NMSKH = from_storage(k_NMSKH, q_NQH.dtype), from_storage(v_NMSKH, q_NQH.dtype)
    k_NCKH = k_NMSKH.reshape(N, M * bs, K, H)
    v_NCKH = v_NMSKH.reshape(N, M * bs, K, H)
    q_NKGH = q_NQH.reshape(N, K, Q // K, H)
    s_NKGC = jnp.einsum("nkgh,nckh->nkgc", q_NKGH.astype(jnp.float32),
                        k_NCKH.astype(jnp.float32)) * scale
    visible_NC = jnp.arange(M * bs)[None, :] <= positions_N[:, None]
    s_NKGC = jnp.where(visible_NC[:, None, None, :], s_NKGC, -jnp.inf)
    p_NKGC = jax.nn.softmax(s_NKGC, axis=-1)
    o_NKGH = jnp.einsum("nkgc,nckh->nkgh", p_NKGC, v_NCKH.astype(jnp.float32))
    return o_NKGH.reshape(N, Q, H).astype(q_NQH.dtype)


__all__ = [
    "SCRATCH_BLOCK",
    "BlockAllocator",
    "CacheFullError",
    "from_storage",
    "paged_attention_reference",
    "prefix_keys",
    "storage_dtype",
    "write_pages",
]
