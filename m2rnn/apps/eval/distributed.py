"""Data-parallel evaluation: `m2rnn eval ...` under `accelerate launch` or `torchrun` (WORLD_SIZE > 1).

Each process loads the model on its own device (`cuda:LOCAL_RANK`, or the CPU over gloo) and generates for its
share of every batch; the outputs are gathered back into the one-process order, so scores equal a one-process run
with the same `--batch-size` (which stays per process: a global batch of WORLD_SIZE × batch-size prompts is split
into the same groups a one-process run would generate together). Only rank 0 writes the output folder.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any

import torch

GenerateFn = Callable[[Sequence[str], int, bool], list[str]]


def world_size() -> int:
    """Processes of the launch (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def init_data_parallel() -> None:
    """Join the launcher's process group (NCCL on GPUs, gloo on CPUs) and pin this process to its GPU, so that
    `--device cuda` means `cuda:LOCAL_RANK`; nothing without a launcher or once joined."""
    if world_size() == 1 or torch.distributed.is_initialized():
        return
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")


def shard(items: Sequence[Any], index: int, size: int) -> list[Any]:
    """Process `index`'s share of `items`: the `size` items from `index * size` (fewer or none at the end), so the
    processes together generate in the groups a one-process run with batch size `size` would form."""
    return list(items[index * size : (index + 1) * size])


def merge(shards: Sequence[Sequence[Any]]) -> list[Any]:
    """The inverse of `shard` over all processes: the items in their original order."""
    return [item for part in shards for item in part]


class DataParallelGenerator:
    """A `GenerateFn` that splits each call's prompts across the processes and returns every output on every one.

    Every process must make the same calls (the commands' loops do: they are driven by the same data and seed).
    """

    def __init__(self, generate: GenerateFn, batch_size: int):
        self.generate, self.batch_size = generate, batch_size

    def __call__(self, prompts: Sequence[str], max_new_tokens: int, stop_at_newline: bool = False) -> list[str]:
        count = world_size()
        if len(prompts) > count * self.batch_size:
            raise ValueError(f"{len(prompts)} prompts in one call, more than {count} processes x batch size "
                             f"{self.batch_size}")
        mine = shard(prompts, rank(), self.batch_size)
        outputs = self.generate(mine, max_new_tokens, stop_at_newline) if mine else []
        gathered: list[list[str]] = [[] for _ in range(count)]
        torch.distributed.all_gather_object(gathered, outputs)
        return merge(gathered)


def data_parallel(generate: GenerateFn, batch_size: int) -> GenerateFn:
    """`generate` itself in one process; under a launcher a `DataParallelGenerator` (`batch_size` per process)."""
    if world_size() == 1:
        return generate
    init_data_parallel()
    return DataParallelGenerator(generate, batch_size)


def run_on_every_rank(body: Callable[[Path], str], output: Callable[[], ContextManager[Path]]) -> str | None:
    """`body(folder)` on every process; rank 0 runs it inside `output()` (the staged --output-dir), the others in a
    scratch folder that is deleted. Returns the summary on rank 0, None elsewhere."""
    if is_main_process():
        with output() as folder:
            return body(folder)
    with tempfile.TemporaryDirectory(prefix="m2rnn-eval-rank") as scratch:
        body(Path(scratch))
    return None


def global_batch_size(batch_size: int) -> int:
    """The prompts each generation call takes across all processes (`--batch-size` is per process)."""
    return batch_size * world_size()


__all__ = [
    "DataParallelGenerator",
    "data_parallel",
    "global_batch_size",
    "init_data_parallel",
    "is_main_process",
    "merge",
    "rank",
    "run_on_every_rank",
    "shard",
    "world_size",
]
