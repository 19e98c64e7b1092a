"""Reading and writing checkpoint tensors one at a time.

Sources are sharded safetensors (with or without `model.safetensors.index.json`) or PyTorch pickles
(`.bin`/`.pt`, through torch). Tensors are listed from file headers without reading data, and read in row
ranges, so a converter never holds more than a slice of one tensor. The writer lays out safetensors files from a
plan made up front (names, dtypes, shapes), then fills them in any order.
"""

from __future__ import annotations

import json
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .config import DTYPES


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or inconsistent; the message names the file (and key)."""


# safetensors dtype codes <-> MLX dtypes
ST_TO_MX = {
    "F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "F64": mx.float32,
    "U32": mx.uint32, "I32": mx.int32, "I64": mx.int64, "U8": mx.uint8, "I8": mx.int8, "BOOL": mx.bool_,
    "U16": mx.uint16, "I16": mx.int16,
}
MX_TO_ST = {
    mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.int32: "I32",
    mx.int64: "I64", mx.uint8: "U8", mx.int8: "I8", mx.bool_: "BOOL", mx.uint16: "U16", mx.int16: "I16",
}
# How raw bytes of each dtype are read with NumPy (bfloat16 travels as uint16 and is reinterpreted).
ST_TO_NP = {
    "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "U32": np.uint32, "I32": np.int32,
    "I64": np.int64, "U8": np.uint8, "I8": np.int8, "BOOL": np.bool_, "U16": np.uint16, "I16": np.int16,
}
DTYPE_NAMES = {name: getattr(mx, name) for name in DTYPES}


def itemsize(dtype: mx.Dtype) -> int:
    return dtype.size


def to_numpy(x: mx.array) -> np.ndarray:
    """Raw little-endian bytes of `x` as a NumPy array (bfloat16 as uint16)."""
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.asarray(x)


@dataclass
class TensorSource:
    """One tensor in a source checkpoint, read lazily."""

    name: str
    file: Path
    shape: tuple
    dtype: str  # safetensors code, e.g. "BF16"
    _offset: int = 0  # safetensors: absolute byte offset of the data
    _torch: object = None  # pickles: the (memory-mapped) torch tensor

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.numel * np.dtype(ST_TO_NP[self.dtype]).itemsize

    def read(self, start: int = 0, stop: int | None = None) -> mx.array:
        """Rows `[start, stop)` along the first axis (the whole tensor by default)."""
        shape = list(self.shape) or [1]
        stop = shape[0] if stop is None else stop
        if self._torch is not None:
            return _torch_to_mx(self._torch.reshape(shape)[start:stop]).reshape([stop - start] + shape[1:])
        np_dtype = np.dtype(ST_TO_NP[self.dtype])
        row = int(np.prod(shape[1:])) * np_dtype.itemsize
        data = _scratch((stop - start) * row)
        with open(self.file, "rb", buffering=0) as f:
            f.seek(self._offset + start * row)
            got = f.readinto(data)
        if got != (stop - start) * row:
            raise CheckpointError(f"{self.file}: truncated while reading {self.name!r}")
        a = mx.array(np.frombuffer(data, dtype=np_dtype).reshape([stop - start] + shape[1:]))
        if self.dtype == "BF16":
            a = a.view(mx.bfloat16)
        elif self.dtype == "F64":
            a = a.astype(mx.float32)
        return a if self.shape else a.reshape(())


_read_buffer = threading.local()


def _scratch(nbytes: int) -> memoryview:
    """A reused read buffer (one per thread): a fresh multi-megabyte allocation per chunk costs more in page
    faults than the read itself. `read` copies out of it before returning."""
    buffer = getattr(_read_buffer, "data", None)
    if buffer is None or len(buffer) < nbytes:
        buffer = _read_buffer.data = bytearray(nbytes)
    return memoryview(buffer)[:nbytes]


def release_read_buffer():
    """Free this thread's read buffer (at most one converter chunk, about 64 MB)."""
    _read_buffer.data = None


def _torch_to_mx(t) -> mx.array:
    import torch

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
    if t.dtype == torch.float64:
        t = t.float()
    return mx.array(t.numpy())


def read_safetensors_header(path: Path) -> list[TensorSource]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    base = 8 + n
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in ST_TO_NP:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        if base + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {base + end} but the file has {size} bytes"
            )
        t = TensorSource(name, path, tuple(info["shape"]), info["dtype"], _offset=base + begin)
        if t.nbytes != end - begin:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {t.shape}")
        tensors.append(t)
    return tensors


def read_torch_pickle(path: Path) -> list[TensorSource]:
    path = Path(path)
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: reading PyTorch checkpoints needs torch (pip install torch), or convert the folder to "
            "safetensors first"
        ) from None
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many kinds for bad files
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    codes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL"}
    out = []
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.dtype not in codes:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
        out.append(TensorSource(name, path, tuple(t.shape), codes[t.dtype], _torch=t))
    return out


WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, as its index names them (or all shards when there is none)."""
    folder = Path(folder)
    for index_name in WEIGHT_INDEXES:
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a valid weight index (needs a 'weight_map')") from None
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (folder / name).is_file():
                    keys = [k for k, v in weight_map.items() if v == name]
                    raise CheckpointError(f"{index}: names {name!r} (for {keys[0]!r} and others) but {folder / name} does not exist")
            return [folder / f for f in files]
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if not files:
        files = sorted(folder.glob("pytorch_model*.bin")) or sorted(folder.glob("*.bin")) or sorted(folder.glob("*.pt"))
    if not files:
        raise CheckpointError(f"{folder}: no weights found (*.safetensors, pytorch_model*.bin or *.pt)")
    return files


def list_tensors(folder: Path) -> list[TensorSource]:
    """Every tensor in a checkpoint folder, from headers only; a name in two files is an error."""
    tensors, seen = [], {}
    for path in checkpoint_files(folder):
        found = read_safetensors_header(path) if path.suffix == ".safetensors" else read_torch_pickle(path)
        for t in found:
            if t.name in seen:
                raise CheckpointError(f"{path}: tensor {t.name!r} is also in {seen[t.name]}")
            seen[t.name] = path
            tensors.append(t)
    return tensors


# --- writing -----------------------------------------------------------------------------------------------------


@dataclass
class PlannedTensor:
    name: str
    dtype: mx.Dtype
    shape: tuple

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * itemsize(self.dtype) if self.shape else itemsize(self.dtype)


class SafetensorsWriter:
    """Writes one safetensors file whose tensors are all declared up front; data is filled in row ranges."""

    def __init__(self, path: Path, tensors: list[PlannedTensor], metadata: dict | None = None):
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = metadata
        self._cursor = {}
        for t in tensors:
            header[t.name] = {"dtype": MX_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            self._cursor[t.name] = offset
            offset += t.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keeps the data 8-byte aligned, as the reference writer does
        self._base = 8 + len(blob)
        self._end = {t.name: self._cursor[t.name] + t.nbytes for t in tensors}
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)
        self._f.truncate(self._base + offset)

    def write(self, name: str, chunk: mx.array):
        """Append the next rows of tensor `name`."""
        data = np.ascontiguousarray(to_numpy(chunk)).reshape(-1).view(np.uint8)  # no extra copy
        pos = self._cursor[name]
        if pos + data.nbytes > self._end[name]:
            raise RuntimeError(f"writer: too many bytes for {name!r}")
        self._f.seek(self._base + pos)
        self._f.write(data)
        self._cursor[name] = pos + data.nbytes

    def abort(self):
        self._f.close()

    def close(self):
        short = [n for n, c in self._cursor.items() if c != self._end[n]]
        self._f.close()
        if short:
            raise RuntimeError(f"writer: tensors left incomplete: {short[:3]}")
