"""What a run prints: the package's Python loggers, all under ``logging.getLogger("lightning_memopt")``.

- ``lightning_memopt.badam``: the start-of-fit summary of the BAdam strategies (blocks, their sizes, the predicted
  memory), at ``INFO``.
- ``lightning_memopt.block_switch``: :class:`~lightning_memopt.BlockSwitch`'s schedule: the first block and the
  schedule at the start, one line per pass over the blocks at ``INFO``; every block switch at ``DEBUG``.
- ``lightning_memopt.memory``: :class:`~lightning_memopt.MemoryReport`'s table at the end of fit, at ``INFO``.
- ``lightning_memopt.eight_bit``, ``lightning_memopt.state_free``, ``lightning_memopt.sample_generation``: what
  :class:`~lightning_memopt.EightBitState` swapped, what :class:`~lightning_memopt.StateFreeUpdates` costs, the
  generated samples; one ``INFO`` record each, at the start of fit (the samples at each validation).

They print on rank 0 only. Like Lightning's own logger, the ``lightning_memopt`` logger is set to ``INFO`` and, when
the root logger has no handler when the package is imported, gets one that writes the bare message to ``sys.stderr``
(so that Rich's progress bar prints the line above itself) and does not propagate. Set the levels as usual: every
block switch, or nothing but warnings::

    import logging

    logging.getLogger("lightning_memopt").setLevel(logging.DEBUG)  # each switch too
    logging.getLogger("lightning_memopt.block_switch").setLevel(logging.WARNING)  # no schedule lines

Example::

    >>> from lightning_memopt.log import get_logger
    >>> get_logger("block_switch").name
    'lightning_memopt.block_switch'
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from lightning.pytorch.utilities.rank_zero import rank_zero_only

__all__ = ["PACKAGE_LOGGER", "get_logger", "logs_on_this_rank", "rank_zero_log"]

PACKAGE_LOGGER = "lightning_memopt"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A ``StreamHandler`` on whatever ``sys.stderr`` is when a record is written, not when the handler was made: a
    progress bar that redirects it (Rich's live display) then prints the line above the bar instead of through it."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # StreamHandler.__init__ assigns its stream; this handler always looks sys.stderr up


def _configure(logger: logging.Logger) -> None:
    # as lightning.pytorch configures its logger: INFO unless the user chose a level, and a handler of its own only
    # when the application configured no logging (then the root's handlers would print everything twice)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not logging.getLogger().hasHandlers() and not logger.handlers:
        logger.addHandler(_StderrHandler())
        logger.propagate = False


_configure(logging.getLogger(PACKAGE_LOGGER))


def get_logger(name: str) -> logging.Logger:
    """The package's logger ``lightning_memopt.<name>``.

    Example::

        >>> get_logger("badam").parent.name
        'lightning_memopt'
    """
    return logging.getLogger(f"{PACKAGE_LOGGER}.{name}")


def logs_on_this_rank(logger: logging.Logger, level: int) -> bool:
    """Whether a record at ``level`` would be handled here: this is rank 0 and the level is enabled. Check it before
    building a message that costs something to compute.

    Example::

        >>> logs_on_this_rank(get_logger("block_switch"), logging.DEBUG)  # INFO by default
        False
    """
    return getattr(rank_zero_only, "rank", 0) == 0 and logger.isEnabledFor(level)


def rank_zero_log(logger: logging.Logger, level: int, message: str) -> None:
    """Log ``message`` at ``level`` on rank 0 only (every rank runs the callbacks; one should speak).

    Example::

        >>> rank_zero_log(get_logger("badam"), logging.DEBUG, "not shown at the default level")
    """
    if logs_on_this_rank(logger, level):
        logger.log(level, message, stacklevel=2)
