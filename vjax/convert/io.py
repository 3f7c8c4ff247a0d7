"""Reading and writing PyTorch checkpoints without unpickling code, one tensor at a time.

Sources, by preference:
  * safetensors — a single ``*.safetensors`` file or a directory of shards listed in
    ``model.safetensors.index.json``. Parsed here directly (8-byte header length, JSON header,
    raw little-endian data) and memory-mapped, so a tensor is read only when asked for and bf16
    arrives as ``ml_dtypes.bfloat16`` without a torch round trip.
  * ``.pth`` / ``.bin`` — ``torch.load(weights_only=True, mmap=True)``: torch's restricted unpickler
    refuses any pickle that would import or call code; we re-raise that as
    :class:`UnsafeCheckpointError` naming the file. Nested dicts (``{"model": {...}}``) are flattened
    with dots.

When a directory holds both layouts, safetensors wins.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool),
}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (names the file)."""


class UnsafeCheckpointError(CheckpointError):
    """A ``.pth``/``.bin`` whose pickle would run code; refused, nothing executed."""


class TensorSource:
    """Lazy, name-addressed tensors from one or more files: ``keys()``, ``shape(k)``, ``get(k)``."""

    def __init__(self):
        self._where: dict[str, tuple] = {}

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key][1])

    def get(self, key: str) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError


class SafetensorsSource(TensorSource):
    """Safetensors files, indexed from their headers; ``get`` reads one tensor's bytes into a fresh array.

    Nothing but the JSON headers is read up front. Each ``get`` is one positioned read of exactly that
    tensor (no file mapping stays resident), so converting a sharded checkpoint holds one tensor of the
    input at a time, whatever the total size.
    """

    def __init__(self, files: Iterable[str | os.PathLike]):
        super().__init__()
        for f in files:
            f = str(f)
            try:
                with open(f, "rb") as fh:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    header = json.loads(fh.read(n))
            except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
            base = 8 + n
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{f}: tensor {name!r} has unsupported dtype {info['dtype']}")
                if name in self._where:
                    raise CheckpointError(f"tensor {name!r} appears in two files: {self._where[name][0]} and {f}")
                start, end = info["data_offsets"]
                self._where[name] = (f, tuple(info["shape"]), info["dtype"], base + start, base + end)

    def get(self, key: str) -> np.ndarray:
        shape = self._where[key][1]
        return self.get_rows(key, 0, shape[0]) if shape else self._read(key, (), 0)

    def get_rows(self, key: str, start_row: int, stop_row: int) -> np.ndarray:
        """Rows ``start_row:stop_row`` of a tensor (contiguous bytes), read from disk into a fresh array."""
        f, shape, dtype, start, end = self._where[key]
        dt = SAFETENSORS_DTYPES[dtype]
        if (end - start) != dt.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(f"{f}: tensor {key!r} has {end - start} bytes, {shape} {dtype} needs "
                                  f"{dt.itemsize * int(np.prod(shape, dtype=np.int64))}")
        row = dt.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        return self._read(key, (stop_row - start_row, *shape[1:]), start_row * row)

    def _read(self, key: str, shape: tuple, offset: int) -> np.ndarray:
        f, _, dtype, start, end = self._where[key]
        out = np.empty(shape, SAFETENSORS_DTYPES[dtype])
        start, end = start + offset, start + offset + out.nbytes
        with open(f, "rb", buffering=0) as fh:
            fh.seek(start)
            view = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
            got = 0
            while got < end - start:
                n = fh.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{f}: truncated while reading tensor {key!r}")
                got += n
        return out


def _torch_to_numpy(t) -> np.ndarray:
    import torch  # noqa: PLC0415

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _import_torch(path: str | os.PathLike):
    """``torch``, or a :class:`CheckpointError` naming ``path`` when PyTorch is not installed (the base install
    has no PyTorch; only ``.pth``/``.bin`` files need it)."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        raise CheckpointError(f"{path}: reading .pth/.bin files needs PyTorch, which is not installed: "
                              f"pip install torch (the CPU build is enough), or convert the file to "
                              f"safetensors elsewhere") from None
    return torch


def load_torch_file(path: str | os.PathLike) -> dict:
    """``torch.load(path, weights_only=True)`` (memory-mapped when possible); errors name the file.

    A pickle that would import or call anything but tensor-container code is refused by torch's
    restricted unpickler before it runs; that becomes :class:`UnsafeCheckpointError`.
    """
    torch = _import_torch(path)

    def refuse(e: Exception):
        msg = str(e)
        if "Weights only load failed" in msg or "weights_only" in msg:
            first = next((ln for ln in msg.splitlines() if "GLOBAL" in ln or "Unsupported" in ln), msg.splitlines()[0])
            return UnsafeCheckpointError(
                f"{path}: refused — its pickle needs code beyond plain tensors ({first.strip()}). "
                f"vjax loads .pth/.bin only with torch.load(weights_only=True); convert the file to "
                f"safetensors in a trusted environment if you trust its source."
            )
        return CheckpointError(f"{path}: cannot read as a PyTorch checkpoint ({msg.splitlines()[0] if msg else e!r})")

    for mmap in (True, False):  # legacy (non-zip) files cannot be memory-mapped
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # noqa: BLE001 - torch raises several types; all become named errors
            if mmap and "mmap" in str(e):
                continue
            raise refuse(e) from e
    raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint")  # pragma: no cover


def _flatten(obj, prefix: str, out: dict) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out)
    else:
        out[prefix[:-1]] = obj


class TorchSource(TensorSource):
    """Tensors from ``.pth``/``.bin`` files loaded with ``weights_only=True`` (nested dicts flattened)."""

    def __init__(self, files: Iterable[str | os.PathLike]):
        super().__init__()
        files = list(files)
        torch = _import_torch(files[0] if files else "")

        self._tensors: dict = {}
        for f in files:
            flat: dict = {}
            _flatten(self._state_dict(load_torch_file(f), f), "", flat)
            for k, v in flat.items():
                if not isinstance(v, torch.Tensor):
                    continue  # optimizer steps, epochs, configs stored beside the weights
                if k in self._where:
                    raise CheckpointError(f"tensor {k!r} appears in two files: {self._where[k][0]} and {f}")
                self._where[k] = (str(f), tuple(v.shape))
                self._tensors[k] = v

    def _state_dict(self, obj, path) -> Any:
        """What of a loaded file holds the tensors (subclasses unwrap training checkpoints)."""
        return obj

    def get(self, key: str) -> np.ndarray:
        return _torch_to_numpy(self._tensors[key])


class MultiSource(TensorSource):
    """Several sources under one namespace, optionally each under a key prefix."""

    def __init__(self, sources: Iterable[tuple[str, TensorSource]]):
        super().__init__()
        self._src: dict[str, tuple[TensorSource, str]] = {}
        for prefix, src in sources:
            for k in src.keys():
                name = prefix + k
                if name in self._src:
                    raise CheckpointError(f"tensor {name!r} is provided twice")
                self._src[name] = (src, k)
                self._where[name] = ("", src.shape(k))

    def get(self, key: str) -> np.ndarray:
        src, k = self._src[key]
        return src.get(k)


class OverlaySource(TensorSource):
    """Several sources combined in order: a key present in more than one is taken from the **last** one
    (the official loaders apply ``load_state_dict`` in sequence, later files overwriting earlier ones).

    Each source may carry a key ``prefix`` (placing e.g. a bare ``eva_vit_g.pth`` under ``visual_encoder.``)
    and ``rename`` maps every key to its canonical spelling first (layout aliases). ``overridden`` lists
    ``(key, earlier label, later label)`` for every replaced key, so callers can report it.
    """

    def __init__(self, sources: Iterable[tuple[str, str, TensorSource]], rename=None):
        super().__init__()
        self._src: dict[str, tuple[TensorSource, str]] = {}
        self._label: dict[str, str] = {}
        self.overridden: list[tuple[str, str, str]] = []
        for label, prefix, src in sources:
            seen: dict[str, str] = {}
            for k in src.keys():
                name = prefix + k
                if rename is not None:
                    name = rename(name)
                if name in seen:
                    raise CheckpointError(f"{label}: tensors {seen[name]!r} and {k!r} are both {name!r}")
                seen[name] = k
                if name in self._src:
                    self.overridden.append((name, self._label[name], label))
                self._src[name] = (src, k)
                self._label[name] = label
                self._where[name] = (label, src.shape(k))

    def origin(self, key: str) -> str:
        return self._label[key]

    def get_rows(self, key: str, start_row: int, stop_row: int) -> np.ndarray:
        src, k = self._src[key]
        if hasattr(src, "get_rows"):
            return src.get_rows(k, start_row, stop_row)
        return src.get(k)[start_row:stop_row]

    def can_read_rows(self, key: str) -> bool:
        return hasattr(self._src[key][0], "get_rows")

    def get(self, key: str) -> np.ndarray:
        src, k = self._src[key]
        return src.get(k)


def checkpoint_files(path: str | os.PathLike) -> tuple[str, list[Path]]:
    """Which files hold the weights at ``path`` and in which format (``"safetensors"`` or ``"torch"``)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix == ".safetensors":
            return "safetensors", [p]
        if p.suffix in (".pth", ".pt", ".bin", ".ckpt"):
            return "torch", [p]
        raise CheckpointError(f"{p}: unknown checkpoint file type {p.suffix!r} (.safetensors, .pth, .bin)")
    index = p / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({p / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shard files that do not exist: {missing}")
        return "safetensors", files
    st = sorted(p.glob("*.safetensors"))
    if st:
        return "safetensors", st
    bin_index = p / "pytorch_model.bin.index.json"
    if bin_index.exists():
        weight_map = json.loads(bin_index.read_text())["weight_map"]
        return "torch", sorted({p / f for f in weight_map.values()})
    pt = sorted([*p.glob("*.bin"), *p.glob("*.pth")])
    if pt:
        return "torch", pt
    raise CheckpointError(f"{p}: no *.safetensors, *.bin or *.pth weights found")


def open_checkpoint(path: str | os.PathLike) -> TensorSource:
    """A lazy :class:`TensorSource` over the weights at ``path`` (file or HF directory)."""
    kind, files = checkpoint_files(path)
    return SafetensorsSource(files) if kind == "safetensors" else TorchSource(files)


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata=None) -> None:
    """Write ``tensors`` to one safetensors file (any of the dtypes in ``SAFETENSORS_DTYPES``)."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _DTYPE_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for arr in arrays:
            fh.write(arr.tobytes())
    os.replace(tmp, path)


def save_sharded_safetensors(
    tensors: Iterator[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
    directory: str | os.PathLike,
    max_shard_bytes: int = 2 * 1024**3,
) -> list[Path]:
    """Write HF-style shards ``model-0000i-of-0000n.safetensors`` plus the index (or one file)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    shards: list[dict] = [{}]
    size = 0
    total = 0
    for name, arr in items:
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
        total += arr.nbytes
    if len(shards) == 1:
        out = [d / "model.safetensors"]
        save_safetensors(shards[0], out[0])
        return out
    n = len(shards)
    weight_map, out = {}, []
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_safetensors(shard, d / fname)
        weight_map.update({k: fname for k in shard})
        out.append(d / fname)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out
