"""Declarative weight-mapping tables between PyTorch state dicts and vjax parameter trees.

A table is a list of :class:`Rule` s. ``Rule("model.layers.{i}.mlp.up_proj.weight",
"layers_{i}/mlp/up_proj/kernel", "T")`` maps every layer index ``{i}`` (any ``{name}`` placeholder
matches digits) and transposes on the way in and back out. :class:`Split` maps one fused tensor to
several vjax parameters (e.g. a fused ``query_key_value`` weight) and joins them on export.

:func:`convert` first plans the whole mapping from names and shapes only — nothing is read — and
raises :class:`ConversionError` listing every missing, unexpected and mis-shaped tensor by name; only
then does it read tensors one at a time (memory-mapped sources stay on disk until read).

Tables name the unrolled layout (``layers_{i}``, ``blocks_{i}``). A model with scanned layers
(``scan_layers``: a group ``layers`` / ``blocks`` with every leaf ``[N, ...]``, :mod:`vjax.layers.scan`) is
served by the same tables: :func:`convert` plans against the unrolled form of ``expected`` and writes each
layer into its slice of the stacked array, and :func:`export` reads the slices back, so every converter and
``vjax.pretrained`` get both layouts from these two functions.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from vjax.convert.io import TensorSource
from vjax.layers.scan import scanned_groups, unstack_all
from vjax.pytree import flatten_params, unflatten_params  # noqa: F401 (re-exported)

Transform = Callable[[np.ndarray], np.ndarray]

# name -> (to_vjax, to_torch, shape_to_vjax)
TRANSFORMS: dict[str, tuple[Transform, Transform, Callable[[tuple], tuple]]] = {
    "id": (lambda x: x, lambda x: x, lambda s: tuple(s)),
    "T": (lambda x: np.transpose(x), lambda x: np.transpose(x), lambda s: tuple(reversed(s))),
    # conv weights: torch [O, I, *K] <-> flax [*K, I, O]
    "conv": (
        lambda x: np.transpose(x, tuple(range(2, x.ndim)) + (1, 0)),
        lambda x: np.transpose(x, (x.ndim - 1, x.ndim - 2) + tuple(range(x.ndim - 2))),
        lambda s: tuple(s[2:]) + (s[1], s[0]),
    ),
}


class ConversionError(ValueError):
    """Raised before anything is loaded when a checkpoint does not fit the model; names every key."""

    def __init__(self, missing=(), unexpected=(), mismatched=(), context: str = ""):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)

        def show(xs, n=25):
            xs = list(xs)
            return ", ".join(map(str, xs[:n])) + (f", ... ({len(xs) - n} more)" if len(xs) > n else "")

        parts = [f"checkpoint does not match the model{' (' + context + ')' if context else ''}:"]
        if self.missing:
            parts.append(f"  missing {len(self.missing)} tensor(s) the model needs: {show(self.missing)}")
        if self.unexpected:
            parts.append(f"  {len(self.unexpected)} unexpected tensor(s) no parameter takes: {show(self.unexpected)}")
        if self.mismatched:
            parts.append("  shape mismatches: " + show(
                f"{k} has {tuple(got)}, model expects {tuple(want)}" for k, got, want in self.mismatched))
        if self.mismatched:
            parts.append("Nothing was loaded. A shape mismatch cannot be loaded, not even with strict=False "
                         "(--nostrict): the model config does not match the checkpoint. Use the config it was "
                         "saved with (the sources' config.json, --variant or --config_file).")
        else:
            parts.append("Nothing was loaded. Pass strict=False (--nostrict on the command line) to load a "
                         "partial checkpoint on purpose.")
        super().__init__("\n".join(parts))


def _compile(pattern: str) -> re.Pattern:
    """``{name}`` matches digits (a layer index); ``**`` matches anything (only useful in :class:`Skip`)."""
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}|\*\*", pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        out.append(".*" if m.group(0) == "**" else f"(?P<{m.group(1)}>\\d+)")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out) + r"\Z")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One torch tensor <-> one vjax parameter. ``dst`` is a ``/``-separated path in ``params``."""

    src: str
    dst: str
    transform: str = "id"

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}; known: {sorted(TRANSFORMS)}")

    @property
    def dsts(self) -> tuple[str, ...]:
        return (self.dst,)

    def plan(self, shape: tuple, fields: Mapping[str, str]) -> list[tuple[str, tuple]]:
        return [(self.dst.format(**fields), TRANSFORMS[self.transform][2](shape))]

    def load(self, x: np.ndarray) -> list[np.ndarray]:
        return [TRANSFORMS[self.transform][0](x)]

    def export(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return TRANSFORMS[self.transform][1](parts[0])


@dataclasses.dataclass(frozen=True)
class Split:
    """One fused torch tensor <-> several vjax parameters, split along torch ``axis`` by ``sizes``."""

    src: str
    dst: tuple[str, ...]
    sizes: tuple[int, ...]
    axis: int = 0
    transform: str = "id"

    @property
    def dsts(self) -> tuple[str, ...]:
        return self.dst

    def plan(self, shape: tuple, fields: Mapping[str, str]) -> list[tuple[str, tuple]]:
        if sum(self.sizes) != shape[self.axis]:
            return [(d.format(**fields), ("split", tuple(shape), self.sizes)) for d in self.dst]
        out = []
        for d, n in zip(self.dst, self.sizes):
            s = list(shape)
            s[self.axis] = n
            out.append((d.format(**fields), TRANSFORMS[self.transform][2](tuple(s))))
        return out

    def load(self, x: np.ndarray) -> list[np.ndarray]:
        parts = np.split(x, np.cumsum(self.sizes)[:-1], axis=self.axis)
        return [TRANSFORMS[self.transform][0](p) for p in parts]

    def export(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([TRANSFORMS[self.transform][1](p) for p in parts], axis=self.axis)


@dataclasses.dataclass(frozen=True)
class Skip:
    """A torch tensor that is accepted and dropped (e.g. ``lm_head.weight`` of a tied model,
    rotary ``inv_freq`` buffers): it is neither loaded nor reported as unexpected. ``**`` in ``src``
    matches any run of characters (``Skip("text_model.**")`` drops a whole sub-model)."""

    src: str

    @property
    def dsts(self) -> tuple[str, ...]:
        return ()

    def plan(self, shape, fields):
        return []

    def load(self, x):
        return []


@dataclasses.dataclass(frozen=True)
class PadRows:
    """A torch ``[n, D]`` row table (embedding / LM head) <-> a vjax parameter with ``rows >= n`` rows.

    Rows ``n..rows-1`` are filled with the mean of the stored rows: the initialisation LLaVA and
    Video-ChatGPT give the rows of tokens they add (``initialize_vision_tokenizer``). With ``n == rows``
    this is a plain :class:`Rule`. Export writes all ``rows`` rows.
    """

    src: str
    dst: str
    rows: int
    transform: str = "id"

    @property
    def dsts(self) -> tuple[str, ...]:
        return (self.dst,)

    def plan(self, shape: tuple, fields: Mapping[str, str]) -> list[tuple[str, tuple]]:
        path = self.dst.format(**fields)
        if len(shape) != 2 or shape[0] > self.rows:
            return [(path, ("rows", tuple(shape), self.rows))]  # never a real shape: reported as mismatch
        return [(path, TRANSFORMS[self.transform][2]((self.rows, shape[1])))]

    def load(self, x: np.ndarray) -> list[np.ndarray]:
        if x.shape[0] < self.rows:
            mean = x.astype(np.float64).mean(axis=0).astype(x.dtype)
            x = np.concatenate([x, np.broadcast_to(mean, (self.rows - x.shape[0], x.shape[1]))], axis=0)
        return [TRANSFORMS[self.transform][0](x)]

    def export(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return TRANSFORMS[self.transform][1](parts[0])


Table = Sequence["Rule | Split | Skip | PadRows"]


def with_prefix(table: Table, dst_prefix: str = "", src_prefix: str = "") -> list:
    """The same rules with ``src_prefix`` before every torch key and ``dst_prefix`` before every vjax
    path, to place a component's table inside a larger model (``"vision/"``, ``"llm/"``)."""
    out = []
    for rule in table:
        kw = {"src": src_prefix + rule.src}
        if hasattr(rule, "dst"):
            kw["dst"] = (dst_prefix + rule.dst if isinstance(rule.dst, str)
                         else tuple(dst_prefix + d for d in rule.dst))
        out.append(dataclasses.replace(rule, **kw))
    return out


@dataclasses.dataclass
class Plan:
    """The outcome of matching checkpoint names against a table and the model's expected shapes."""

    assignments: list[tuple[str, Any, dict]]  # (torch key, rule, fields)
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple, tuple]]


def plan_conversion(names_shapes: Mapping[str, tuple], table: Table, expected: Mapping[str, tuple]) -> Plan:
    """Match torch names (with shapes) to vjax paths (with shapes) through ``table``; reads nothing."""
    compiled = [(_compile(r.src), r) for r in table]
    assignments, unexpected, mismatched = [], [], []
    provided: set[str] = set()
    mismatched_paths: set[str] = set()
    for key, shape in names_shapes.items():
        for rx, rule in compiled:
            m = rx.match(key)
            if m:
                break
        else:
            unexpected.append(key)
            continue
        fields = m.groupdict()
        targets = rule.plan(tuple(shape), fields)
        ok = True
        for path, shp in targets:
            if path not in expected:
                unexpected.append(f"{key} (-> {path})")
                ok = False
            elif tuple(expected[path]) != shp:
                mismatched.append((key, tuple(shape), _torch_shape(rule, path, expected, fields)))
                mismatched_paths.add(path)
                ok = False
            if path in provided:
                unexpected.append(f"{key} (a second tensor for {path})")
                ok = False
        if ok:
            provided.update(p for p, _ in targets)
            assignments.append((key, rule, fields))
    missing = [_torch_name(p, table) for p in expected if p not in provided and p not in mismatched_paths]
    return Plan(assignments, missing, unexpected, mismatched)


def _torch_name(path: str, table: Table) -> str:
    """``"model.layers.0.mlp.up_proj.weight (-> layers_0/mlp/up_proj/kernel)"`` for error messages."""
    for rule in table:
        for d in rule.dsts:
            m = _compile(d).match(path)
            if m:
                return f"{rule.src.format(**m.groupdict())} (-> {path})"
    return f"(no rule) -> {path}"


def _torch_shape(rule, path, expected, fields) -> tuple:
    """The torch-side shape the model expects for ``path`` (for error messages)."""
    want = tuple(expected[path])
    if isinstance(rule, (Rule, PadRows)):
        inv = TRANSFORMS[rule.transform]
        return tuple(inv[1](np.empty(want, np.uint8)).shape) if want else want
    parts = [tuple(expected.get(d.format(**fields), ())) for d in rule.dsts]
    torch_parts = [np.empty(p, np.uint8) for p in parts]
    try:
        return tuple(rule.export(torch_parts).shape)
    except ValueError:
        return want


def convert(
    source: TensorSource,
    table: Table,
    expected: Mapping[str, Any],
    *,
    strict: bool = True,
    dtype: Any = None,
    context: str = "",
    progress: bool = False,
) -> dict[str, Any]:
    """Load ``source`` into a nested params dict shaped like ``expected``.

    Args:
      source: lazy tensors (see :mod:`vjax.convert.io`).
      table: the layout's rules.
      expected: vjax params (arrays or ``jax.ShapeDtypeStruct`` from ``jax.eval_shape``), nested or
        flat ``{"a/b": ...}``; gives the target shapes and, unless ``dtype`` is set, dtypes.
      strict: raise :class:`ConversionError` on any missing/unexpected/mis-shaped tensor. With
        ``strict=False`` mismatches are still errors; missing ones are left out and unexpected ones
        ignored (the caller merges the partial tree).
    Returns:
      nested ``dict`` of NumPy arrays, read one tensor at a time.
    """
    flat_expected = expected if all("/" in k for k in expected) and not any(
        isinstance(v, Mapping) for v in expected.values()) else flatten_params(expected)
    stacked = _Stacked(flat_expected)
    flat_expected = stacked.unrolled
    want_shapes = {k: tuple(v.shape) for k, v in flat_expected.items()}
    plan = plan_conversion({k: source.shape(k) for k in source.keys()}, table, want_shapes)
    if plan.mismatched or (strict and (plan.missing or plan.unexpected)):
        raise ConversionError(plan.missing, plan.unexpected, plan.mismatched, context)
    out: dict[str, np.ndarray] = {}
    for key, rule, fields in tqdm(plan.assignments, desc="converting", disable=not progress, unit="tensor"):
        if _blockwise(source, key, rule):  # a transposed matrix, filled block by block: no full-size temporary
            path = rule.dst.format(**fields)
            target = np.dtype(dtype) if dtype is not None else np.dtype(flat_expected[path].dtype)
            slot = stacked.slot(out, path, target)
            if slot is None:
                out[path] = _read_transposed(source, key, target)
            else:
                _read_transposed(source, key, target, slot)
            continue
        parts = rule.load(source.get(key))
        for path_t, arr in zip(rule.dsts, parts):
            path = path_t.format(**fields)
            target = np.dtype(dtype) if dtype is not None else np.dtype(flat_expected[path].dtype)
            slot = stacked.slot(out, path, target)
            if slot is None:
                out[path] = _owned(arr, target)
            else:
                slot[...] = arr
        del parts
    stacked.check_complete(context)
    return unflatten_params(out)


class _Stacked:
    """Where each unrolled path of a scanned model lives: ``<group>_<i>/<rest>`` is slice ``i`` of
    ``<group>/<rest>`` (leaves ``[N, ...]``). The stacked arrays are allocated on first write and filled layer by
    layer, so converting a scanned model holds no second copy of its layers."""

    def __init__(self, flat_expected: Mapping[str, Any]):
        self.groups = scanned_groups(flat_expected)
        self.unrolled = flat_expected
        if self.groups:  # shapes only: no slice of a real array is taken here
            self.unrolled = unstack_all({k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype)
                                         for k, v in flat_expected.items()})
        self.shapes = {k: tuple(v.shape) for k, v in flat_expected.items()}
        self.where: dict[str, tuple[str, int]] = {}
        for prefix, _ in self.groups:
            rx = re.compile(re.escape(prefix) + r"_(\d+)/(.+)")
            for path in self.unrolled:
                m = rx.fullmatch(path)
                if m:
                    self.where[path] = (f"{prefix}/{m.group(2)}", int(m.group(1)))
        self.filled: dict[str, set[int]] = {}

    def slot(self, out: dict, path: str, dtype: np.dtype) -> np.ndarray | None:
        """The view of ``out[<group>/<rest>]`` that holds ``path`` (``None`` for a path outside any group)."""
        if path not in self.where:
            return None
        full, i = self.where[path]
        if full not in out:
            out[full] = np.empty(self.shapes[full], dtype)
        self.filled.setdefault(full, set()).add(i)
        return out[full][i]

    def check_complete(self, context: str = "") -> None:
        """A partial load (``strict=False``) cannot leave holes in a stacked array: name the layers missing."""
        holes = [f"{full}: layers {sorted(set(range(self.shapes[full][0])) - got)}"
                 for full, got in sorted(self.filled.items()) if len(got) != self.shapes[full][0]]
        if holes:
            raise ConversionError(missing=holes, context=(context + "; " if context else "") + (
                "a scanned model (scan_layers) needs every layer of a group in one load; convert into the unrolled "
                "config and stack with vjax.layers.scan.stack_layers after merging"))


_BLOCK_BYTES = 8 << 20


def _blockwise(source: TensorSource, key: str, rule) -> bool:
    shape = source.shape(key)
    return (type(rule) is Rule and rule.transform == "T" and len(shape) == 2 and hasattr(source, "get_rows")
            and getattr(source, "can_read_rows", lambda k: True)(key))


def _read_transposed(source: TensorSource, key: str, dtype: np.dtype, out: np.ndarray | None = None) -> np.ndarray:
    """``source[key].T`` as a new C-contiguous array (or written into ``out``), reading ~8 MiB of rows at a time."""
    rows, cols = source.shape(key)
    out = np.empty((cols, rows), dtype) if out is None else out
    step = max(1, _BLOCK_BYTES // max(1, cols * 4))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        out[:, r0:r1] = source.get_rows(key, r0, r1).T
    return out


def _owned(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``arr`` as a C-contiguous array of ``dtype`` that owns its memory (copied only when needed, so
    converting holds one transient copy of one tensor at most)."""
    base = arr
    while isinstance(base, np.ndarray) and base.base is not None and isinstance(base.base, np.ndarray):
        base = base.base
    fresh = isinstance(base, np.ndarray) and base.flags.owndata and not isinstance(base, np.memmap)
    if fresh and arr.dtype == dtype and arr.flags.c_contiguous and arr.flags.writeable and arr.size == base.size:
        return arr
    return np.array(arr, dtype=dtype, order="C", copy=True)


def export_plan(paths: Sequence[str], table: Table) -> list[tuple[str, Any, list[str]]]:
    """``(torch key, rule, [vjax paths])`` for every vjax parameter path; reads no values.

    Raises :class:`ConversionError` naming any parameter that no rule exports.
    """
    available = set(paths)
    used: set[str] = set()
    items = []
    for rule in table:
        if not rule.dsts:
            continue
        rx = _compile(rule.dsts[0])
        for path in sorted(available):
            m = rx.match(path)
            if not m:
                continue
            fields = m.groupdict()
            parts = [d.format(**fields) for d in rule.dsts]
            if all(p in available for p in parts) and not used.intersection(parts):
                used.update(parts)
                items.append((rule.src.format(**fields), rule, parts))
    left = sorted(available - used)
    if left:
        raise ConversionError(unexpected=left, context="parameters with no export rule")
    return items


def export(params: Mapping[str, Any], table: Table) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(torch key, array)`` for every parameter; the inverse of :func:`convert`. Scanned groups are
    exported layer by layer (one slice of a stacked array read at a time)."""
    flat = flatten_params(params)
    stacked = _Stacked(flat)
    where = stacked.where

    def get(path):
        if path in where:
            full, i = where[path]
            return np.asarray(jax.device_get(flat[full][i]))
        return np.asarray(jax.device_get(flat[path]))

    for key, rule, parts in export_plan(list(stacked.unrolled), table):
        yield key, rule.export([get(p) for p in parts])
