"""Streaming a single safetensors file, one tensor at a time.

``safetensors.numpy.save_file`` needs every tensor in memory at once; a consolidated
checkpoint (the ``zero_to_fp32`` equivalent) can be larger than host memory. The format is
simple and fixed (8-byte little-endian header length, a JSON header of names, dtypes, shapes
and byte offsets, then the raw little-endian bytes in header order), so the header is
written first from the shapes alone and each tensor is appended as it is produced. The file
is written to a temporary name and renamed when complete. The result is read back with
``safetensors`` itself in the tests.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

_ST_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float64): "F64",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint32): "U32",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}


def write_safetensors(
    path: str | os.PathLike,
    tensors: Iterable[tuple[str, tuple[int, ...], Any, Callable[[], np.ndarray]]],
    *,
    metadata: dict[str, str] | None = None,
) -> int:
    """Write ``path`` from ``(name, shape, dtype, produce)`` entries, one tensor in memory.

    Args:
      path: the output file (written atomically).
      tensors: entries in file order; ``produce()`` returns the tensor (cast to ``dtype``).
      metadata: string-to-string ``__metadata__``.

    Returns:
      Bytes written.

    Raises:
      ValueError: an unsupported dtype, a duplicate name, or a tensor whose shape differs
        from the one declared (named).
    """
    entries = list(tensors)
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape, dtype, _ in entries:
        dt = np.dtype(dtype)
        if dt not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {dt} cannot be stored in safetensors")
        if name in header:
            raise ValueError(f"duplicate tensor name {name!r}")
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data section to 8 bytes
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(len(head).to_bytes(8, "little"))
            fh.write(head)
            for name, shape, dtype, produce in entries:
                arr = np.ascontiguousarray(np.asarray(produce(), dtype=dtype))
                if arr.shape != tuple(shape):
                    raise ValueError(f"{name}: produced shape {arr.shape}, declared {shape}")
                if arr.dtype.byteorder == ">":
                    arr = arr.byteswap().view(arr.dtype.newbyteorder("<"))
                fh.write(arr.reshape(-1).view(np.uint8).data)
                del arr
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return 8 + len(head) + offset


__all__ = ["write_safetensors"]
