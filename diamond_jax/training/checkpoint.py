"""Run checkpoints (orbax): the arrays of the run state, and a JSON record of where the run stands.

Saves are synchronous and atomic (orbax writes a temporary directory and renames it when complete). On
restore, a newest checkpoint that cannot be read is reported and the one before it is used.
"""

import logging
import os
from typing import Any, Dict, Optional, Tuple

import orbax.checkpoint as ocp

STATE, META = "state", "meta"


class RunCheckpointer:
    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, index: int, state: Any, meta: Dict[str, Any]) -> None:
        self._manager.save(index, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                                              META: ocp.args.JsonSave(meta)}), force=True)
        self._manager.wait_until_finished()

    def all_indices(self):
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state: Any) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
        """(index, state, meta) of the newest readable checkpoint, or None when there is none at all."""
        indices = self.all_indices()
        for index in reversed(indices):
            try:
                restored = self._manager.restore(index, args=ocp.args.Composite(**{
                    STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}))
                return index, restored[STATE], restored[META]
            except Exception as error:  # any failure to read means this checkpoint cannot be trusted
                logging.warning("Checkpoint %s is unreadable (%s: %s); trying the one before it.",
                                os.path.join(self.directory, str(index)), type(error).__name__, error)
        if indices:
            raise RuntimeError(f"None of the checkpoints in {self.directory} ({indices}) could be read. Fix: "
                               "move that directory away to start the run afresh, or restore it from a backup.")
        return None

    def close(self) -> None:
        self._manager.close()
