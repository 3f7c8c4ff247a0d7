"""Path-keyed views of nested parameter dicts (``{"a": {"b": x}} <-> {"a/b": x}``).

A leaf utility: imports nothing from vjax, so every level (layers to experiments) may use it.
"""

from __future__ import annotations

from typing import Any, Mapping


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": x}} -> {"a/b": x}`` (also unboxes Flax partitioning metadata)."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if hasattr(v, "unbox"):
            v = v.unbox()
        if isinstance(v, Mapping):
            out.update(flatten_params(v, path + "/"))
        else:
            out[path] = v
    return out


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_params`."""
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree
