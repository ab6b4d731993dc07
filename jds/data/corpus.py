"""The embedded default corpus and loading a user's own token data.

``embedded_corpus`` owns the byte-level corpus ``jds train`` uses when no data is given:
the ``.py`` source of the Python standard library that runs jds. Every Python install
has it, so training works offline with nothing to download. ``load_tokens`` owns reading
a user's data (a folder of text files, one text file, a ``.npy`` or a raw ``.bin`` token
file) into a 1-D integer array, memory-mapped where the format allows.

Text is byte-level: token id = byte value (vocab 256), no tokenizer involved.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import numpy.typing as npt

# Bumped whenever the corpus recipe changes, so stale disk caches are never read.
CORPUS_FORMAT_VERSION = 1

# Folders under the stdlib that are not stdlib source text: installed packages, test
# suites (mostly fixtures and machine-generated data), bytecode, build configuration.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "lib-dynload",
                        "test", "tests", "idle_test"})

# Suffixes ``load_tokens`` reads as UTF-8 text (one byte = one token).
TEXT_SUFFIXES: tuple[str, ...] = (
    ".txt", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go",
    ".java", ".js", ".ts", ".sh", ".tex", ".html", ".xml", ".json", ".jsonl", ".yaml",
    ".yml", ".toml", ".csv", ".tsv", ".ini", ".cfg",
)
TOKEN_SUFFIXES: tuple[str, ...] = (".npy", ".bin")


def file_header(relpath: str) -> bytes:
    """The line that precedes each file in the embedded corpus.

    A Python comment, so the corpus stays valid Python text, and it names the file so a
    reader (or a test) can tell which files landed in which split.
    """
    return f"# file: {relpath}\n".encode()


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _skip_dir(name: str) -> bool:
    # config-3.X-<platform> holds the build's Makefile and install-specific scripts.
    return name in _SKIP_DIRS or name.startswith(("test_", "config-", "."))


def _skip_file(name: str) -> bool:
    # _sysconfigdata* records this machine's build paths: install-specific, not source.
    return (not name.endswith(".py") or name.startswith(("test_", "_sysconfigdata"))
            or name == "conftest.py")


def _stdlib_manifest() -> list[tuple[str, int]]:
    """Sorted ``(relative posix path, size in bytes)`` of the stdlib's source files."""
    root = _stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(
            f"the Python standard library was not found at {root} "
            "(sysconfig.get_paths()['stdlib']); pass your own data with train.data instead"
        )
    out: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _skip_dir(d)]
        for name in filenames:
            if _skip_file(name):
                continue
            full = os.path.join(dirpath, name)
            try:
                size = os.path.getsize(full)
            except OSError:  # a dangling symlink in an odd install: not source we can read
                continue
            out.append((Path(full).relative_to(root).as_posix(), size))
    out.sort()
    return out


def _hash_order(relpath: str) -> int:
    # sha256, not hash(): str hashing is salted per process, this must be stable.
    return int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big")


def _split_files(manifest: list[tuple[str, int]], val_fraction: float,
                 max_bytes: int | None) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Assign whole files to val / train in a hash order until each split's byte budget.

    Walking files in hash-of-path order makes both the validation set and the subset kept
    under ``max_bytes`` a deterministic pseudo-random sample of the library rather than
    alphabetical runs (all of ``asyncio``, say). A file goes to val if it still fits the
    val budget, else to train if it fits there, else it is left out, so the val share lands
    just under ``val_fraction`` even when one file is large.
    """
    total = sum(len(file_header(p)) + s for p, s in manifest)
    budget = total if max_bytes is None else min(total, max_bytes)
    val_target = val_fraction * budget
    train_target = float("inf") if max_bytes is None else budget - val_target
    root = _stdlib_root()
    val: dict[str, bytes] = {}
    train: dict[str, bytes] = {}
    val_bytes = train_bytes = 0
    for relpath, size in sorted(manifest, key=lambda ps: _hash_order(ps[0])):
        cost = len(file_header(relpath)) + size
        if val_bytes + cost <= val_target:
            dest = "val"
        elif train_bytes + cost <= train_target:
            dest = "train"
        else:
            continue
        try:
            data = (root / relpath).read_bytes()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):  # skip unreadable / non-UTF-8 files
            continue
        cost = len(file_header(relpath)) + len(data)
        if dest == "val":
            val[relpath], val_bytes = data, val_bytes + cost
        else:
            train[relpath], train_bytes = data, train_bytes + cost
    if not val or not train:
        raise ValueError(
            f"embedded_corpus(val_fraction={val_fraction}, max_bytes={max_bytes}) left the "
            f"{'validation' if not val else 'training'} split empty ({len(manifest)} stdlib "
            "files found); raise max_bytes or choose val_fraction in (0.01, 0.5)"
        )
    return train, val


def _join(files: dict[str, bytes]) -> np.ndarray:
    parts: list[bytes] = []
    for relpath in sorted(files):
        data = files[relpath]
        parts.append(file_header(relpath))
        parts.append(data if data.endswith(b"\n") else data + b"\n")
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def cache_dir() -> Path:
    """Where jds caches derived data: ``$JDS_CACHE_DIR``, else ``$XDG_CACHE_HOME/jds``,
    else ``~/.cache/jds``."""
    if env := os.environ.get("JDS_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jds"


def build_corpus(val_fraction: float, max_bytes: int | None,
                 cache: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Build (or read from the disk cache) the embedded corpus; no in-memory caching.

    The disk key covers the recipe version, the Python version, the parameters and the
    list of stdlib files with their sizes, so a different or modified stdlib never reads
    a stale entry.

    Args:
      val_fraction: share of bytes held out, in (0, 1).
      max_bytes: cap on train + val bytes, or None for the whole library.
      cache: folder for the ``.npz`` cache, or None to skip the disk cache.

    Returns:
      ``(train_T, val_T)``, read-only uint8 arrays.

    Raises:
      ValueError: a parameter out of range, or a split that came out empty.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1), e.g. 0.05")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes} must be a positive int or None (no cap)")
    manifest = _stdlib_manifest()
    key_src = json.dumps([CORPUS_FORMAT_VERSION, list(sys.version_info[:3]),
                          sys.implementation.name, val_fraction, max_bytes, manifest])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}"
    path = None if cache is None else cache / f"corpus-{tag}-{key}.npz"
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                train, val = z["train"], z["val"]
            train.flags.writeable = val.flags.writeable = False
            return train, val
        except (OSError, ValueError, KeyError):  # a truncated/corrupt entry: rebuild it
            pass
    train_files, val_files = _split_files(manifest, val_fraction, max_bytes)
    train, val = _join(train_files), _join(val_files)
    if path is not None:
        _atomic_save(path, train=train, val=val)
    return train, val


def _atomic_save(path: Path, **arrays: np.ndarray) -> None:
    """Write an ``.npz`` via a temp file + rename so a concurrent reader never sees half.

    A cache that cannot be written (read-only home, full disk) only costs speed, so the
    error is swallowed: the corpus itself was built correctly.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass


@functools.cache
def _embedded_corpus_cached(val_fraction: float,
                            max_bytes: int | None) -> tuple[np.ndarray, np.ndarray]:
    return build_corpus(val_fraction, max_bytes, cache_dir())


def embedded_corpus(*, val_fraction: float = 0.05,
                    max_bytes: int | None = 8_000_000) -> tuple[np.ndarray, np.ndarray]:
    """The default byte-level corpus: the Python standard library's own ``.py`` source.

    Files under ``sysconfig.get_paths()["stdlib"]`` are taken, skipping site-packages,
    test folders and files, and anything not UTF-8. Whole files are split into train and
    validation by a hash of their relative path, so validation is held-out files, not a
    tail slice of the same text. Each split is its files in sorted path order, each
    preceded by a ``# file: <relative path>`` line.

    The contents depend on the Python version (the standard library differs between
    versions and a little between builds), so losses are comparable only between runs on
    the same Python. Results are cached in memory and on disk (see ``cache_dir``).

    Args:
      val_fraction: share of bytes held out for validation, in (0, 1).
      max_bytes: cap on train + validation bytes (a hash-ordered subset of files), or
        None for the whole library (about 12 MB on Python 3.11).

    Returns:
      ``(train_T, val_T)``: read-only uint8 arrays of byte ids (vocab 256).

    Raises:
      FileNotFoundError: the standard library folder does not exist.
      ValueError: a parameter out of range, or a split that came out empty.
    """
    return _embedded_corpus_cached(float(val_fraction), None if max_bytes is None
                                   else int(max_bytes))


def _read_text(path: Path) -> bytes:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {e.start}): convert it to UTF-8 "
            "(e.g. iconv -t UTF-8) or remove it from the data"
        ) from None
    return data


def _check_token_array(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim != 1:
        raise ValueError(
            f"{path} holds an array of shape {arr.shape}; jds expects a 1-D token stream: "
            "save it flattened (np.save(path, arr.reshape(-1)))"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{path} has dtype {arr.dtype}; token ids must be integers: save them with "
            "arr.astype(np.uint16) (or int32 for vocabularies over 65536)"
        )
    if arr.size == 0:
        raise ValueError(f"{path} holds no tokens; point train.data at a non-empty file")
    return arr


def load_tokens(path: str | os.PathLike, *, dtype: npt.DTypeLike | None = None
                ) -> np.ndarray:
    """Load a user's token data as a 1-D integer array.

    Accepted forms:
      * a folder: every file with a suffix in ``TEXT_SUFFIXES`` below it (hidden files
        and folders skipped), in sorted relative-path order, read as UTF-8 bytes and
        joined with a newline -> uint8 byte ids (vocab 256);
      * one text file (suffix in ``TEXT_SUFFIXES``) -> uint8 byte ids;
      * ``.npy`` -> memory-mapped, read with ``allow_pickle=False``;
      * ``.bin`` -> raw token ids memory-mapped with ``np.memmap``; uint16 unless ``dtype``
        says otherwise (the nanoGPT convention).

    Args:
      path: file or folder.
      dtype: element type of a ``.bin`` file; for ``.npy`` only checked against the file.

    Returns:
      ``tokens_T``: 1-D integer array (a read-only memmap for ``.npy``/``.bin``).

    Raises:
      FileNotFoundError: the path does not exist.
      ValueError: an empty folder or file, an unsupported suffix, non-UTF-8 text, an
        ``.npy`` that is not 1-D integers, a ``.bin`` whose size is not a multiple of the
        dtype's size, or a ``dtype`` that disagrees with an ``.npy`` file.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"train data {p} does not exist: give a folder of text files, a text file, "
            "a .npy or a .bin token file"
        )
    if p.is_dir():
        files = sorted(
            f for f in p.rglob("*")
            if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        if not files:
            raise ValueError(
                f"folder {p} has no text files with a supported suffix "
                f"({' '.join(TEXT_SUFFIXES)}); add some, or pass a .npy/.bin token file "
                "directly"
            )
        data = b"\n".join(_read_text(f) for f in files)
        if not data:
            raise ValueError(f"the text files in {p} are all empty; add some text")
        return np.frombuffer(data, dtype=np.uint8)
    suffix = p.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        data = _read_text(p)
        if not data:
            raise ValueError(f"{p} is empty; point train.data at a file with text in it")
        return np.frombuffer(data, dtype=np.uint8)
    if suffix == ".npy":
        arr = _check_token_array(np.load(p, mmap_mode="r", allow_pickle=False), p)
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            raise ValueError(
                f"{p} stores {arr.dtype} but dtype={np.dtype(dtype)} was asked for; an .npy "
                "file carries its own dtype: drop the dtype argument"
            )
        return arr
    if suffix == ".bin":
        dt = np.dtype(np.uint16 if dtype is None else dtype)
        if not np.issubdtype(dt, np.integer):
            raise ValueError(f"dtype={dt} for {p}: token ids must be an integer dtype")
        size = p.stat().st_size
        if size == 0:
            raise ValueError(f"{p} is empty; point train.data at a file with tokens in it")
        if size % dt.itemsize:
            raise ValueError(
                f"{p} is {size} bytes, not a multiple of {dt.itemsize} ({dt}); pass the "
                "dtype the file was written with (dtype=np.uint32, ...)"
            )
        return np.memmap(p, dtype=dt, mode="r")
    raise ValueError(
        f"{p}: unsupported suffix {p.suffix!r}; use a text file "
        f"({' '.join(TEXT_SUFFIXES)}), a .npy or a .bin token file, or a folder of text files"
    )
