"""jds.data: embedded corpus, token file loading, BatchLoader determinism/resume, baselines."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from jds.data import (
    BatchLoader,
    corpus,
    embedded_corpus,
    eval_batches,
    load_tokens,
    unigram_entropy,
)
from jds.data.corpus import build_corpus

_HEADER = re.compile(rb"^# file: (\S+)$", re.MULTILINE)


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
    """Keep the corpus disk cache out of the user's ~/.cache during tests."""
    mp = pytest.MonkeyPatch()
    mp.setenv("JDS_CACHE_DIR", str(tmp_path_factory.mktemp("jds_cache")))
    corpus._embedded_corpus_cached.cache_clear()
    yield
    corpus._embedded_corpus_cached.cache_clear()
    mp.undo()


def _files(tokens: np.ndarray) -> set[bytes]:
    return set(_HEADER.findall(tokens.tobytes()))


# --- embedded corpus -------------------------------------------------------------------

def test_embedded_corpus_basic_and_deterministic():
    train, val = embedded_corpus()
    assert train.dtype == np.uint8 and val.dtype == np.uint8
    assert train.ndim == val.ndim == 1
    assert len(train) > 1_000_000 and len(val) > 50_000
    assert len(train) + len(val) <= 8_000_000
    assert not train.flags.writeable  # the cached copy cannot be mutated by a caller
    train2, val2 = embedded_corpus()
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(val, val2)
    # Rebuilt from scratch (no memory or disk cache): the same bytes.
    train3, val3 = build_corpus(0.05, 8_000_000, None)
    np.testing.assert_array_equal(train, train3)
    np.testing.assert_array_equal(val, val3)
    assert train.tobytes().decode("utf-8")  # valid UTF-8 text


def test_embedded_corpus_split_by_file_and_fraction():
    train, val = embedded_corpus(val_fraction=0.1, max_bytes=3_000_000)
    tf, vf = _files(train), _files(val)
    assert len(tf) > 50 and len(vf) > 5
    assert not tf & vf, f"files in both splits: {sorted(tf & vf)[:5]}"
    assert not any(b"/test/" in f or b"/tests/" in f or f.startswith(b"test") for f in tf | vf)
    assert not any(b"site-packages" in f for f in tf | vf)
    frac = len(val) / (len(train) + len(val))
    assert 0.08 <= frac <= 0.101, frac
    assert len(train) + len(val) <= 3_000_000


def test_embedded_corpus_disk_cache(tmp_path):
    a = build_corpus(0.05, 500_000, tmp_path)
    cached = list(tmp_path.glob("corpus-*.npz"))
    assert len(cached) == 1
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file behind
    b = build_corpus(0.05, 500_000, tmp_path)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    # A corrupt entry is rebuilt, not trusted.
    cached[0].write_bytes(b"garbage")
    c = build_corpus(0.05, 500_000, tmp_path)
    np.testing.assert_array_equal(a[0], c[0])


def test_embedded_corpus_bad_args():
    with pytest.raises(ValueError, match="val_fraction"):
        embedded_corpus(val_fraction=1.5)
    with pytest.raises(ValueError, match="max_bytes"):
        embedded_corpus(max_bytes=0)


# --- load_tokens -----------------------------------------------------------------------

def test_load_tokens_folder_of_text(tmp_path):
    (tmp_path / "b.txt").write_text("world")
    (tmp_path / "a.md").write_text("héllo")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.py").write_text("x=1")
    (tmp_path / "skip.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.txt").write_text("secret")
    toks = load_tokens(tmp_path)
    assert toks.dtype == np.uint8
    assert toks.tobytes() == "héllo\nworld\nx=1".encode()
    single = load_tokens(tmp_path / "b.txt")
    assert single.tobytes() == b"world"


def test_load_tokens_npy_and_bin(tmp_path):
    arr = np.arange(1000, dtype=np.uint16) * 7
    np.save(tmp_path / "t.npy", arr)
    got = load_tokens(tmp_path / "t.npy")
    assert isinstance(got, np.memmap) and got.dtype == np.uint16
    np.testing.assert_array_equal(got, arr)

    arr.tofile(tmp_path / "t.bin")
    got = load_tokens(tmp_path / "t.bin")
    assert isinstance(got, np.memmap) and got.dtype == np.uint16
    np.testing.assert_array_equal(got, arr)

    wide = np.arange(300, dtype=np.uint32) * 100_000
    wide.tofile(tmp_path / "w.bin")
    np.testing.assert_array_equal(load_tokens(tmp_path / "w.bin", dtype=np.uint32), wide)


def test_load_tokens_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokens(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        load_tokens(tmp_path / "empty")
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"x\.parquet.*unsupported suffix"):
        load_tokens(tmp_path / "x.parquet")
    np.save(tmp_path / "two_d.npy", np.zeros((4, 5), np.int32))
    with pytest.raises(ValueError, match=r"two_d\.npy.*shape \(4, 5\).*reshape"):
        load_tokens(tmp_path / "two_d.npy")
    np.save(tmp_path / "f.npy", np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="integers"):
        load_tokens(tmp_path / "f.npy")
    (tmp_path / "odd.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match=r"odd\.bin is 3 bytes.*multiple of 2"):
        load_tokens(tmp_path / "odd.bin")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match=r"latin\.txt is not UTF-8"):
        load_tokens(tmp_path / "latin.txt")
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_tokens(tmp_path / "blank.txt")


# --- unigram entropy -------------------------------------------------------------------

def test_unigram_entropy_known_distributions():
    uniform = np.tile(np.arange(8, dtype=np.int32), 50)
    assert unigram_entropy(uniform, 8) == pytest.approx(math.log(8), abs=1e-12)
    assert unigram_entropy(uniform, 256) == pytest.approx(math.log(8), abs=1e-12)
    assert unigram_entropy(np.full(10, 3, np.uint8), 256) == 0.0
    # p = (1/2, 1/4, 1/4): H = 1.5 bits.
    toks = np.array([0, 0, 1, 2] * 25, np.uint16)
    assert unigram_entropy(toks, 3) == pytest.approx(1.5 * math.log(2), abs=1e-12)
    with pytest.raises(ValueError, match="max id 9"):
        unigram_entropy(np.arange(10), 5)


# --- BatchLoader -----------------------------------------------------------------------

def _take(loader: BatchLoader, n: int) -> list[np.ndarray]:
    return [loader.next() for _ in range(n)]


def test_loader_shape_and_determinism():
    toks = np.arange(10_000, dtype=np.int64) % 50_000
    a = _take(BatchLoader(toks, global_batch=4, seq_len=16, seed=1), 5)
    b = _take(BatchLoader(toks, global_batch=4, seq_len=16, seed=1), 5)
    c = _take(BatchLoader(toks, global_batch=4, seq_len=16, seed=2), 5)
    assert a[0].shape == (4, 16) and a[0].dtype == np.int32
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    # Rows are contiguous token windows.
    for row in a[0]:
        np.testing.assert_array_equal(row, np.arange(row[0], row[0] + 16))


@pytest.mark.parametrize("shuffle", [True, False])
def test_loader_every_window_once_per_epoch(shuffle):
    t, b = 8, 3
    toks = np.arange(203, dtype=np.int32)  # token value = position, so rows identify windows
    loader = BatchLoader(toks, global_batch=b, seq_len=t, seed=0, shuffle=shuffle)
    w = loader.windows_per_epoch
    assert w == ((203 - t + 1) // t if shuffle else 203 // t)
    starts = np.concatenate([x[:, 0] for x in _take(loader, 3 * w // b + 1)])  # straddles
    offsets = set()
    for e in range(3):
        ep = starts[e * w:(e + 1) * w]
        off = int(ep[0]) % t
        offsets.add(off)
        assert sorted(ep.tolist()) == [off + i * t for i in range(w)]
    if shuffle:
        assert not np.array_equal(starts[:w], np.sort(starts[:w]))
    else:
        assert offsets == {0}
        assert starts[:w].tolist() == [i * t for i in range(w)]


def test_loader_resume_exact_through_json():
    toks = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)
    kw = dict(global_batch=5, seq_len=32, seed=7, vocab_size=256)
    ref = BatchLoader(toks, **kw)
    full = _take(ref, 80)  # > 1 epoch (155 windows / 5 per batch = 31 batches)
    for k in (0, 3, 31, 45):
        first = BatchLoader(toks, **kw)
        _take(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        assert set(state) >= {"seed", "epoch", "index", "global_batch", "seq_len",
                              "num_tokens"}
        resumed = BatchLoader(toks, **{**kw, "seed": 123})  # the saved seed wins
        resumed.load_state_dict(state)
        assert resumed.position == 5 * k
        for x, y in zip(_take(resumed, 10), full[k:k + 10], strict=True):
            np.testing.assert_array_equal(x, y)


def test_loader_resume_with_other_global_batch():
    toks = np.arange(4000, dtype=np.int32)
    ref = BatchLoader(toks, global_batch=4, seq_len=10, seed=3)
    stream = np.concatenate(_take(ref, 30))  # 120 windows in order of service
    first = BatchLoader(toks, global_batch=4, seq_len=10, seed=3)
    _take(first, 5)
    resumed = BatchLoader(toks, global_batch=6, seq_len=10, seed=3)
    resumed.load_state_dict(first.state_dict())
    got = np.concatenate(_take(resumed, 4))
    np.testing.assert_array_equal(got, stream[20:44])
    assert resumed.position == 44


def test_loader_state_mismatch_errors():
    toks = np.arange(1000, dtype=np.int32)
    state = BatchLoader(toks, global_batch=2, seq_len=10).state_dict()
    with pytest.raises(ValueError, match="seq_len=10.*seq_len=20"):
        BatchLoader(toks, global_batch=2, seq_len=20).load_state_dict(state)
    with pytest.raises(ValueError, match="num_tokens=1000.*num_tokens=900"):
        BatchLoader(toks[:900], global_batch=2, seq_len=10).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        BatchLoader(toks, global_batch=2, seq_len=10).load_state_dict({"seed": 0})


def test_loader_construction_errors():
    with pytest.raises(ValueError, match=r"100 tokens.*global_batch=8.*at least 287 tokens"):
        BatchLoader(np.arange(100), global_batch=8, seq_len=32)
    with pytest.raises(ValueError, match="max id 999"):
        BatchLoader(np.arange(1000), global_batch=2, seq_len=10, vocab_size=256)
    with pytest.raises(ValueError, match="1-D"):
        BatchLoader(np.zeros((10, 10), np.int32), global_batch=2, seq_len=2)


def test_next_reads_only_the_requested_rows_and_advances_the_whole_batch():
    full = BatchLoader(np.arange(2000, dtype=np.int32), global_batch=8, seq_len=16)
    part = BatchLoader(np.arange(2000, dtype=np.int32), global_batch=8, seq_len=16)
    rows = np.array([2, 3, 6, 7])  # a process's block of both micro-batches (GA 2)
    for _ in range(3):
        batch = full.next()
        np.testing.assert_array_equal(part.next(rows=rows), batch[rows])
    assert part.state_dict() == full.state_dict()


def test_loader_iterates_embedded_corpus():
    train, _ = embedded_corpus()
    loader = BatchLoader(train, global_batch=8, seq_len=128, vocab_size=256)
    batch = next(iter(loader))
    assert batch.shape == (8, 128) and batch.max() < 256


# --- eval batches ----------------------------------------------------------------------

def test_eval_batches_fixed_and_evenly_spaced():
    toks = np.arange(1000, dtype=np.int32)
    a = eval_batches(toks, batch=4, seq_len=10, num_batches=3)
    b = eval_batches(toks, batch=4, seq_len=10, num_batches=3)
    assert len(a) == 3 and all(x.shape == (4, 10) and x.dtype == np.int32 for x in a)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    starts = np.concatenate([x[:, 0] for x in a])
    assert starts[0] == 0 and starts[-1] == 990  # spans the whole set
    gaps = np.diff(starts)
    assert gaps.min() >= 89 and gaps.max() <= 91
    with pytest.raises(ValueError, match="fewer than seq_len=10"):
        eval_batches(toks[:5], batch=1, seq_len=10, num_batches=1)
