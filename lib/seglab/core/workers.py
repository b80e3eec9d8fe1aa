"""Worker processes and torch threads: the one process pool of the library.

Fine-tunes (:mod:`seglab.segment.finetuning`), network passes (:mod:`seglab.segment.output_cache`)
and inference shards (:mod:`seglab.segment.cohort_prediction`) run several at a time in
:func:`worker_pool`: spawned processes (no fork of a process holding torch threads), each with the
project root and a given number of torch threads. On the 2-core demo machine two one-thread
workers do about twice the work of one two-thread process. The thread count also decides a CPU
fine-tune's weights (float sums in another order): everything that trains uses the notebook's
``torch_threads`` (docs/troubleshooting.md).
"""

from __future__ import annotations

from seglab.core import paths


def _worker_init(root: str, threads: int | None, then=None, then_args: tuple = ()) -> None:
    paths.set_root(root)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    if then is not None:
        then(*then_args)


def worker_pool(n_workers: int, threads_per_job: int | None = 1, then=None, then_args: tuple = ()):
    """A ProcessPoolExecutor of ``n_workers`` spawned processes (no fork of a process holding torch
    threads), each with this project root and ``threads_per_job`` torch threads, then ``then(*then_args)``
    (a module-level function, e.g. one that loads a model once per worker). Shared by the parallel
    fine-tunes, network passes and inference shards of the CPU demo."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=int(n_workers), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init,
                               initargs=(str(paths.project_root()), threads_per_job, then, tuple(then_args)))


def set_threads(n: int | None = 1) -> int:
    """Torch CPU threads for this process (None: leave torch's default); returns the number in use.

    On a small shared CPU one thread is much faster: several threads per process
    spin against other processes' threads (a 256 px tile's mask dynamics took 10 s
    with 2 threads under load, 0.15 s with one).
    """
    import torch

    if n:
        torch.set_num_threads(int(n))
    return int(torch.get_num_threads())
