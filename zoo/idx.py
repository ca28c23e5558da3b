"""IDX files (LeCun's MNIST format): read, write, and find image/label pairs in a folder.

The format: a big-endian header (two zero bytes, a type code, the number of dimensions, then one uint32
per dimension) followed by the data. Files may be gzipped; compression is judged by content.
"""

from __future__ import annotations

import gzip
import math
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from zoo.errors import DataError

__all__ = ["read_idx", "write_idx", "read_idx_cached", "idx_pairs"]

# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        # Judge compression by content, not by name: mirrors rename and re-compress files freely.
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (plain or gzipped) into a numpy array in native byte order.

    Args:
        path: the file.

    Returns:
        The array, shaped by the file's header.

    Raises:
        DataError: if the file is missing, unreadable, truncated or not IDX.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = math.prod(dims)
    if len(raw) - header != count * dtype.itemsize:
        raise DataError(f"{path} is truncated or padded: header says {dims}, data has {len(raw) - header} bytes")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=False)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file, gzipped when ``path`` ends in ``.gz``."""
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise DataError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(_IDX_DTYPES[code], copy=False).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


@lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int) -> np.ndarray:
    # Decompressing Fashion-MNIST takes a fraction of a second; train/val/test loads share it.
    array = read_idx(path)
    array.flags.writeable = False
    return array


def read_idx_cached(path: Path) -> np.ndarray:
    """:func:`read_idx`, memoised on path and modification time; the array is read-only."""
    return _read_idx_cached(str(path), path.stat().st_mtime_ns)


_IDX_NAME = re.compile(r"^(?P<prefix>.+?)[-.](?P<kind>images[-.]idx3|labels[-.]idx1)[-.]ubyte(?:\.gz)?$")


def idx_pairs(folder: Path) -> dict[str, tuple[Path, Path]]:
    """``prefix -> (images file, labels file)`` for the IDX pairs in ``folder``."""
    found: dict[str, dict[str, Path]] = {}
    for entry in sorted(folder.iterdir()):
        match = _IDX_NAME.match(entry.name)
        if match and entry.is_file():
            kind = "images" if match["kind"].startswith("images") else "labels"
            # Prefer the plain file when both plain and .gz exist (no decompression).
            found.setdefault(match["prefix"], {}).setdefault(kind, entry)
    return {p: (f["images"], f["labels"]) for p, f in found.items() if len(f) == 2}
