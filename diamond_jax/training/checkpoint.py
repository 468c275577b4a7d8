"""Run checkpoints (orbax): the arrays of the run state, and a JSON record of where the run stands.

Saves are synchronous and atomic (orbax writes a temporary directory and renames it when complete). On
restore, a newest checkpoint that cannot be read is reported in one line and the one before it is used. A
save that fails for want of disk space raises OSError(ENOSPC) naming the checkpoint directory.
"""

import contextlib
import errno
import gc
import logging
import os
import sys
import tempfile
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
        try:
            with _quiet():
                self._manager.save(index, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                                                      META: ocp.args.JsonSave(meta)}), force=True)
                self._manager.wait_until_finished()
        except Exception as error:
            # TensorStore reports a full disk inside the text of its own exception types.
            full = disk_full(error)
            if full is not None and full.filename is None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.directory) from error
            raise

    def all_indices(self):
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state: Any) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
        """(index, state, meta) of the newest readable checkpoint, or None when there is none at all."""
        indices = self.all_indices()
        unreadable = []
        for index in reversed(indices):
            try:
                # After a failed read, its worker threads go on printing tracebacks during the next read too:
                # then hold back that read's output even when it succeeds.
                with _quiet(pass_on=not unreadable):
                    restored = self._manager.restore(index, args=ocp.args.Composite(**{
                        STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}))
            except Exception as error:  # any failure to read means this checkpoint cannot be trusted
                unreadable.append((index, error))
                continue
            for bad, error in unreadable:
                logging.warning("Checkpoint %s is unreadable (%s); using checkpoint %d, the newest readable one.",
                                os.path.join(self.directory, str(bad)), _first_line(error), index)
            return index, restored[STATE], restored[META]
        for bad, error in unreadable:
            logging.warning("Checkpoint %s is unreadable (%s).", os.path.join(self.directory, str(bad)),
                            _first_line(error))
        if indices:
            raise RuntimeError(f"None of the checkpoints in {self.directory} ({indices}) could be read. Fix: "
                               "move that directory away to start the run afresh, or restore it from a backup.")
        return None

    def close(self) -> None:
        self._manager.close()


def disk_full(error: BaseException) -> Optional[OSError]:
    """The OSError(ENOSPC) behind `error`, anywhere along its chain of causes (one without a file name when
    only the text of a library's exception says so), or None when a full disk did not cause it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return error
        if os.strerror(errno.ENOSPC) in str(error):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        error = error.__cause__ or error.__context__
    return None


def _first_line(error: BaseException, limit: int = 300) -> str:
    """One line on what went wrong, from the root cause: orbax wraps TensorStore's error (the file, the bytes)
    in one whose text is the spec of the array, hundreds of lines."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).split("See full TensorStore details")[0].strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


@contextlib.contextmanager
def _quiet(pass_on: bool = True):
    """Holds back what the libraries print while a checkpoint is read or written, and drops it if that fails:
    a damaged checkpoint or a full disk makes orbax log, and TensorStore's event loop print, a traceback for
    every array (thousands of lines), and the one line the caller reports says what happened. On success the
    output is passed on (unless pass_on is False). Captures the file descriptor, as TensorStore's callbacks
    print from C++."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            gc.collect()  # a failed asyncio task reports its exception when it is collected: collect it here
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if ok and pass_on:
                captured.seek(0)
                sys.stderr.write(captured.read().decode(errors="replace"))
