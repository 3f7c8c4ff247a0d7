"""Orbax checkpoints of the whole training state: params, optimizer state, step, RNG, the Grain
iterator state and the config, saved together, asynchronously, keeping the last ``keep``.

Restoring takes the target shardings explicitly (abstract arrays carrying ``NamedSharding`` s), so a
checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class Checkpoints:
    """A thin wrapper over ``ocp.CheckpointManager`` with items ``state``, ``data``, ``config``."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, *, data_iterator: Any = None, config: Mapping | None = None,
             force: bool = False) -> bool:
        """Start an asynchronous save of ``state`` (a pytree) and the iterator/config beside it."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            import grain  # noqa: PLC0415

            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(dict(config))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: Any, shardings: Any, *, step: int | None = None,
                data_iterator: Any = None) -> Any:
        """Restore ``state`` onto ``shardings`` (and the iterator in place); latest step by default."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = {"state": ocp.args.StandardRestore(_with_shardings(abstract_state, shardings))}
        if data_iterator is not None:
            import grain  # noqa: PLC0415

            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def restore_params(self, abstract_params: Any, *, step: int | None = None) -> Any:
        """Only ``state.params`` (no optimizer state is read), as host-local arrays; latest step by default.
        ``abstract_params``: the tree of ``jax.ShapeDtypeStruct`` (e.g. ``vjax.pretrained.abstract_params``)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                      partial_restore=True)
        return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]

    def config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return dict(self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
