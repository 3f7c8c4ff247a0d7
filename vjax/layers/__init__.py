"""Pure building blocks of vjax. They know nothing of any model.

Axis letters used in shape comments and einsums throughout the layers:

    B batch         L query length        S key/value length (cache slots)
    D model width   H query heads         K key/value heads      Dh head width
    F frames        P patches             Q queries              C clusters
    M memory slots  V vocabulary

Logical axis names carried by parameters (mapped to mesh axes by `vjax.train` rules):
``embed``, ``vocab``, ``heads`` (flattened heads x head width), ``kv_heads``, ``mlp``, ``norm``, and ``layers``
(the leading axis of a scanned block's stacked parameters, `vjax.layers.scan`).
"""
