"""Deterministic, resumable batches of token windows; fixed eval batches; the unigram baseline.

``BatchLoader`` turns a 1-D token stream into ``[B, T]`` int32 batches of ``input_ids``
(the model shifts for its loss internally). The stream of windows is a function of
``(seed, position)`` alone, so a checkpoint stores five integers and resumes exactly.

Window layout, per epoch ``e`` (with ``shuffle=True``):
  * ``rng = np.random.default_rng([seed, e])``; an offset ``o = rng.integers(T)`` and a
    permutation of the ``W = (num_tokens - T + 1) // T`` windows, window ``i`` being
    ``tokens[o + i*T : o + (i+1)*T]``. The offset moves the window boundaries every epoch,
    so a small corpus seen for many epochs is not always cut at the same places; ``W`` is
    chosen so that every offset fits, making it the same for all epochs.
  * with ``shuffle=False``: offset 0, ``W = num_tokens // T``, windows in order.

Epochs follow each other forever and a batch may straddle two of them: the loader walks
one endless sequence of windows, so every window of an epoch is served exactly once and
the position (windows consumed) is independent of the batch size, which is what lets a
run resume with a different ``global_batch``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

# Tokens per chunk when scanning a (possibly memory-mapped) stream.
_CHUNK = 1 << 24
_STATE_KEYS = ("seed", "epoch", "index", "global_batch", "seq_len", "num_tokens")


def _check_tokens(tokens: np.ndarray) -> None:
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1:
        raise ValueError(
            f"tokens must be a 1-D numpy array, got {type(tokens).__name__} of shape "
            f"{getattr(tokens, 'shape', '?')}; flatten it with tokens.reshape(-1)"
        )
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must have an integer dtype, got {tokens.dtype}")


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the unigram distribution estimated on ``tokens``.

    The loss a model reaches by predicting token frequencies alone, ignoring context:
    the baseline ``jds train`` reports next to the validation loss.

    Args:
      tokens: 1-D integer token ids ``tokens_T``.
      vocab_size: number of ids; every token must be in ``[0, vocab_size)``.

    Returns:
      ``-sum_v p_v log p_v`` with ``p_v`` the frequency of id ``v``.

    Raises:
      ValueError: empty tokens, or an id outside ``[0, vocab_size)``.
    """
    _check_tokens(tokens)
    if tokens.size == 0:
        raise ValueError("unigram_entropy needs at least one token, got an empty array")
    if not _ids_fit(tokens, vocab_size):
        lo, hi = int(tokens.min()), int(tokens.max())
        raise ValueError(f"token ids span [{lo}, {hi}] (max id {hi}) but vocab_size="
                         f"{vocab_size}; use the model's vocabulary size or re-tokenize the data")
    counts_V = np.zeros(vocab_size, dtype=np.int64)
    # Chunked: bincount converts to intp, which for a large memmap would be a full copy.
    for lo in range(0, tokens.size, _CHUNK):
        counts_V += np.bincount(tokens[lo:lo + _CHUNK], minlength=vocab_size)
    p_V = counts_V[counts_V > 0] / tokens.size
    return float(-(p_V * np.log(p_V)).sum())


def eval_batches(tokens: np.ndarray, *, batch: int, seq_len: int,
                 num_batches: int) -> list[np.ndarray]:
    """A fixed set of validation batches: ``batch * num_batches`` evenly spaced windows.

    The windows depend only on the arguments, so eval losses are comparable across runs
    and across resumes. Window starts run from 0 to ``len(tokens) - seq_len`` in equal
    steps; when the tokens are too few for that many disjoint windows they overlap
    (still a valid, if less varied, estimate).

    Args:
      tokens: 1-D integer token ids ``tokens_T``.
      batch: rows per batch.
      seq_len: tokens per row.
      num_batches: number of batches.

    Returns:
      ``num_batches`` int32 arrays ``[batch, seq_len]``.

    Raises:
      ValueError: a non-positive size, or fewer than ``seq_len`` tokens.
    """
    _check_tokens(tokens)
    if batch < 1 or seq_len < 1 or num_batches < 1:
        raise ValueError(f"eval_batches needs batch, seq_len, num_batches >= 1, got "
                         f"{batch}, {seq_len}, {num_batches}")
    n_tok = len(tokens)
    if n_tok < seq_len:
        raise ValueError(f"validation data has {n_tok} tokens, fewer than seq_len={seq_len}; "
                         "give more validation data or lower train.seq_len")
    n = batch * num_batches
    starts = (np.arange(n, dtype=np.int64) * (n_tok - seq_len)) // max(n - 1, 1)
    rows_nT = np.asarray(tokens[starts[:, None] + np.arange(seq_len)], dtype=np.int32)
    return list(rows_nT.reshape(num_batches, batch, seq_len))


class BatchLoader:
    """Endless, deterministic ``[global_batch, seq_len]`` batches over a token stream.

    See the module docstring for the window layout. Iterating never stops; epochs roll
    over. ``state_dict``/``load_state_dict`` save and restore the exact position.
    """

    def __init__(self, tokens: np.ndarray, *, global_batch: int, seq_len: int,
                 seed: int = 0, shuffle: bool = True, vocab_size: int | None = None) -> None:
        """Set up the loader (no data is copied; memmaps stay on disk).

        Args:
          tokens: 1-D integer token ids ``tokens_T`` (a memmap is fine).
          global_batch: windows per batch, across all processes.
          seq_len: tokens per window.
          seed: seed of the per-epoch offsets and permutations.
          shuffle: shuffle windows and move their boundaries every epoch; False serves
            ``tokens[i*T:(i+1)*T]`` in order.
          vocab_size: when given, every token must lie in ``[0, vocab_size)``.

        Raises:
          ValueError: non-1-D or non-integer tokens, a non-positive size, too few tokens
            for one batch, or token ids outside the vocabulary.
        """
        _check_tokens(tokens)
        if global_batch < 1 or seq_len < 1:
            raise ValueError(f"global_batch={global_batch} and seq_len={seq_len} must be >= 1")
        n_tok = len(tokens)
        if shuffle:
            # Every offset in [0, T) must leave W whole windows, so W is the same each epoch.
            windows = max(n_tok - seq_len + 1, 0) // seq_len
        else:
            windows = n_tok // seq_len
        if windows < global_batch:
            need = global_batch * seq_len + (seq_len - 1 if shuffle else 0)
            raise ValueError(
                f"{n_tok} tokens make {windows} windows of seq_len={seq_len}, fewer than "
                f"global_batch={global_batch}: one batch needs at least {need} tokens"
                f"{' (shuffle adds seq_len-1 for the random offset)' if shuffle else ''}; "
                "give more data or lower the batch size / seq_len"
            )
        if vocab_size is not None and not _ids_fit(tokens, vocab_size):
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0:
                raise ValueError(f"the data holds negative token ids (min {lo}); token ids "
                                 "must be >= 0: the token file is damaged or was written "
                                 "with another dtype")
            raise ValueError(
                f"token ids span [{lo}, {hi}] (max id {hi}) but the model's vocab_size is "
                f"{vocab_size}; use a model with a vocabulary of at least {hi + 1} or "
                "re-tokenize the data"
            )
        self._tokens = tokens
        self.global_batch = int(global_batch)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.windows_per_epoch = windows
        self._pos = 0
        self._plans: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def num_tokens(self) -> int:
        """Length of the token stream."""
        return len(self._tokens)

    @property
    def position(self) -> int:
        """Windows consumed so far, over all epochs."""
        return self._pos

    @property
    def epoch(self) -> int:
        """The epoch the next window comes from."""
        return self._pos // self.windows_per_epoch

    def _plan(self, epoch: int) -> tuple[int, np.ndarray]:
        """``(offset, window order)`` of an epoch, kept for the current and next epoch."""
        if epoch not in self._plans:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                offset = int(rng.integers(self.seq_len))
                order = rng.permutation(self.windows_per_epoch)
            else:
                offset, order = 0, np.arange(self.windows_per_epoch)
            # A batch touches at most two epochs; older plans are never needed again.
            self._plans = {e: v for e, v in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = (offset, order)
        return self._plans[epoch]

    def next(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The next batch, or only some of its rows.

        Args:
          rows: global row indices to read (a multi-host process's ``engine.local_rows()``);
            only their tokens are read. The position advances by the whole global batch
            either way, so it is the same on every process and for any process count.

        Returns:
          ``input_ids_BT``: int32 ``[global_batch, seq_len]`` (``[len(rows), seq_len]``).
        """
        b, t, w = self.global_batch, self.seq_len, self.windows_per_epoch
        starts_B = np.empty(b, dtype=np.int64)
        filled, pos = 0, self._pos
        while filled < b:
            epoch, index = divmod(pos, w)
            take = min(b - filled, w - index)
            offset, order = self._plan(epoch)
            starts_B[filled:filled + take] = offset + order[index:index + take] * t
            filled += take
            pos += take
        self._pos = pos
        if rows is not None:
            starts_B = starts_B[np.asarray(rows)]
        return np.asarray(self._tokens[starts_B[:, None] + np.arange(t)], dtype=np.int32)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        return self.next()

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: ``seed, epoch, index, global_batch, seq_len, num_tokens``
        (plus ``shuffle``); ``index`` counts windows already served in ``epoch``."""
        epoch, index = divmod(self._pos, self.windows_per_epoch)
        return {"seed": self.seed, "epoch": epoch, "index": index,
                "global_batch": self.global_batch, "seq_len": self.seq_len,
                "num_tokens": self.num_tokens, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the next batch is the one that would have followed.

        The saved seed replaces this loader's seed (resuming means the same stream). A
        different ``global_batch`` is allowed: the loader continues from the same window
        position, so no data is skipped or repeated.

        Args:
          state: a dict from ``state_dict`` (possibly through JSON).

        Raises:
          ValueError: a missing key, or ``seq_len``/``num_tokens``/``shuffle`` that differ
            from this loader's (different data or windows: the position would be
            meaningless), or an out-of-range position.
        """
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"loader state is missing {missing}; pass a dict produced by "
                             "BatchLoader.state_dict()")
        for key, mine in (("seq_len", self.seq_len), ("num_tokens", self.num_tokens)):
            if int(state[key]) != mine:
                raise ValueError(
                    f"loader state has {key}={state[key]} but this loader has {key}={mine}; "
                    "resume with the same data and train.seq_len as the saved run"
                )
        if "shuffle" in state and bool(state["shuffle"]) != self.shuffle:
            raise ValueError(f"loader state has shuffle={state['shuffle']} but this loader "
                             f"has shuffle={self.shuffle}; use the saved run's setting")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.windows_per_epoch:
            raise ValueError(f"loader state epoch={epoch}, index={index} is out of range "
                             f"(index must be in [0, {self.windows_per_epoch}))")
        if int(state["seed"]) != self.seed:
            self.seed = int(state["seed"])
            self._plans = {}
        self._pos = epoch * self.windows_per_epoch + index


def _ids_fit(tokens: np.ndarray, vocab_size: int) -> bool:
    """Whether every id is in ``[0, vocab_size)``, skipping the scan when the dtype says so."""
    info = np.iinfo(tokens.dtype)
    if info.min >= 0 and info.max < vocab_size:
        return True  # e.g. uint8 bytes with vocab 256: no id can be out of range
    return len(tokens) == 0 or (int(tokens.min()) >= 0 and int(tokens.max()) < vocab_size)
