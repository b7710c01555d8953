"""Checkpoint files that are never half-written: a new checkpoint replaces the old one in a single rename.

Lightning's ``TorchCheckpointIO`` serialises the whole checkpoint into memory, writes it to a temporary file in the
*system* temporary directory and moves it into place. The move is atomic only when that directory and the checkpoint
directory are on the same filesystem; otherwise (``/tmp`` on tmpfs, a container's ``/tmp`` next to a mounted volume)
it is a copy into the final path, and a process killed during the copy leaves a truncated ``last.ckpt`` where the
previous, complete one used to be. The in-memory copy also doubles the host memory a checkpoint of a large model
needs, and nothing is flushed to disk before the rename.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

__all__ = ["AtomicCheckpointIO"]

_PARTIAL = ".partial"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file next to its target, flush it to disk, then rename it into place.

    A process killed at any moment (``SIGKILL``, out-of-memory killer, preemption) leaves either the previous
    checkpoint or the new one under the target name, both complete, so ``ckpt_path="last"`` always resumes. The
    temporary file is hidden (``.NAME.HOST.PID.<random>.partial``) and lies in the target's directory, so the rename
    never crosses filesystems; the checkpoint is streamed into it instead of being built in memory first. A partial
    file left by a killed writer on this host is deleted by the next successful save of the same checkpoint.

    Paths on remote filesystems (``s3://``, ``gs://``, ...) are written by Lightning's ``TorchCheckpointIO``, whose
    object-store uploads are already all-or-nothing. The BAdam strategies use this class unless given another
    ``checkpoint_io``.

    It also reads checkpoints whose optimizer state holds tensor subclasses (torchao's 4-bit and 8-bit AdamW), which
    Lightning's own loader refuses: with a plain strategy pass ``plugins=[AtomicCheckpointIO()]`` to resume them.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(plugins=[AtomicCheckpointIO()], logger=False)  # any strategy
        >>> type(trainer.strategy.checkpoint_io).__name__
        'AtomicCheckpointIO'
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{target.name}.{_host()}."
        temporary = target.with_name(f"{prefix}{os.getpid()}.{uuid.uuid4().hex[:8]}{_PARTIAL}")
        try:
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_directory(target.parent)
        _remove_stale_partials(target.parent, prefix)

    @override
    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # Lightning's default map_location is the callable `lambda storage, loc: storage` (tensors stay on the CPU,
        # where torch reads them), which torch.load refuses for tensor subclasses such as torchao's 4-bit/8-bit
        # optimizer state ("Callable map_location not supported with _rebuild_wrapper_subclass"): "cpu" is the same
        location = "cpu" if map_location is None else map_location
        return super().load_checkpoint(path, map_location=location, weights_only=weights_only)  # type: ignore[arg-type]


def _is_local(path: _PATH) -> bool:
    # plain paths only: a URL ("s3://...", also "file://...") goes through fsspec as Lightning does it
    return "://" not in str(path)


def _host() -> str:
    # the writer's host and PID in the name tell a dead writer's leftover from a live one's file in progress
    return socket.gethostname().replace(".", "_") or "host"


def _fsync_directory(directory: Path) -> None:
    # the rename itself must reach the disk too, or a power loss can bring back the old directory entry (POSIX only)
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (network mounts) refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _remove_stale_partials(directory: Path, prefix: str) -> None:
    for leftover in directory.glob(f"{prefix}*{_PARTIAL}"):
        pid = leftover.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
