"""Side-by-side benchmark of memory-efficient fine-tuning methods: memory by category, peak, step time, loss.

Run it with ``python -m lightning_memopt.bench`` (see ``--help``); ``python -m lightning_memopt.bench comm``
measures the bytes communicated per optimizer step under data parallelism. Every method runs in a fresh process on the
same model, data, seed and number of steps. A method is a small declarative :class:`Method` entry: in
:data:`METHODS` for the matrix, ``COMM_METHODS`` for communication, ``FT_METHODS`` (``bench.finetune``) for
fine-tuning; every sub-benchmark builds its Trainer with ``methods.build_trainer`` and starts its rows in fresh
processes through ``matrix.run_worker``.

Example::

    from pathlib import Path
    from lightning_memopt.bench import BenchConfig, run_matrix, select

    run_matrix(select(["adamw-mixed", "badam"]), BenchConfig(layers=4, hidden=64, steps=10), Path("bench_out"))
"""

from lightning_memopt.bench.comm import COMM_METHODS, run_comm
from lightning_memopt.bench.config import BenchConfig
from lightning_memopt.bench.matrix import run_matrix
from lightning_memopt.bench.methods import DEFAULT_METHODS, METHODS, Method, select

__all__ = ["COMM_METHODS", "DEFAULT_METHODS", "METHODS", "BenchConfig", "Method", "run_comm", "run_matrix", "select"]
