"""Data parallelism on two CPU processes over gloo: `examples/finetune.py` through accelerate (DDP, packed batches,
gradient accumulation) keeps bit-identical weights while each process sees different documents; MoE experts that
get no token on a process do not break plain DDP, with and without gradient checkpointing."""

import datetime
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from m2rnn import M2RNNConfig, M2RNNForCausalLM

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"
WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(worker: Callable[..., None], *args, world_size: int = WORLD_SIZE) -> None:
    """Run `worker(rank, *args)` in `world_size` fresh processes joined in a gloo group (30 s collective timeout,
    so a desynchronised group fails instead of hanging)."""
    mp.start_processes(_joined, args=(worker, _free_port(), world_size, args), nprocs=world_size, start_method="spawn")


def _joined(rank: int, worker: Callable[..., None], port: int, world_size: int, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=30))
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


DDP_OPTIONS = ["--cpu", "--max-steps", "3", "--batch-size", "2", "--max-length", "32", "--lr", "1e-2"]


def _worker(rank: int, port: int, out: str) -> None:
    """One process of the group, as torchrun / accelerate launch would start it."""
    import importlib.util

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE), LOCAL_WORLD_SIZE=str(WORLD_SIZE), OMP_NUM_THREADS="1",
    )
    spec = importlib.util.spec_from_file_location("finetune_example", EXAMPLE)
    finetune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune)
    result = finetune.main(DDP_OPTIONS + ["--accumulation", "2", "--check-replicas", "--output-dir",
                                          str(Path(out) / "model")])
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


def test_ddp_two_processes_keep_replicas_equal(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, start_method="spawn")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    for result in results:
        assert result["processes"] == WORLD_SIZE
        assert result["replicas_equal"] is True
    assert results[0]["losses"] == results[1]["losses"]  # the reduced loss of the global batch
    assert len(results[0]["losses"]) == 3

    trained = M2RNNForCausalLM.from_pretrained(tmp_path / "model")
    torch.manual_seed(0)
    initial = M2RNNForCausalLM(trained.config)
    unseen = 4 + 0xC4  # a byte the ASCII corpus never holds: Adam leaves its embedding row at its initial value
    torch.testing.assert_close(trained.model.embed_tokens.weight[unseen], initial.model.embed_tokens.weight[unseen])
    moved = [n for n, p in trained.state_dict().items() if not torch.equal(p, initial.state_dict()[n])]
    assert len(moved) > 20  # the step changed the weights (saved from rank 0 into a staged folder)
    assert not list(tmp_path.glob(".model.*"))  # no staging leftovers

    # one process accumulating both processes' micro-batches sees the same global batch (the one-GPU reference of
    # benchmarks/bench_distributed.py --single-accumulates): the same losses, up to the order of the float sums
    single = tmp_path / "single.json"
    subprocess.run([sys.executable, str(EXAMPLE), *DDP_OPTIONS, "--accumulation", "4", "--no-save", "--report",
                    str(single)], check=True, capture_output=True, text=True, timeout=300)
    single = json.loads(single.read_text())
    assert single["losses"] == pytest.approx(results[0]["losses"], rel=1e-5)
    assert results[0]["timed_tokens"] == single["timed_tokens"]  # every process's tokens, not rank 0's twice


def _moe_worker(rank: int, out: str, checkpointing: bool) -> None:
    """Plain DDP (default `find_unused_parameters=False`) on a model whose MoE layer routes 3 tokens per process
    to 1 of 8 experts, so at least 5 experts get no token on each process."""
    torch.manual_seed(0)
    config = M2RNNConfig.from_preset("tiny", num_experts=8, num_experts_per_tok=1, shared_expert_intermediate_size=0)
    model = M2RNNForCausalLM(config).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(3):
        input_ids = torch.randint(3, 260, (1, 3), generator=torch.Generator().manual_seed(10 * step + rank))
        ddp(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, flat)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"replicas_equal": bool(torch.equal(*gathered))}))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_moe_unrouted_experts_under_plain_ddp(tmp_path, checkpointing):
    spawn(_moe_worker, str(tmp_path), checkpointing)
    for rank in range(WORLD_SIZE):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"replicas_equal": True}


def test_moe_runs_unrouted_experts_only_while_training():
    """Every expert joins the training graph (zero-token experts get zero gradients); evaluation skips them."""
    torch.manual_seed(0)
    model = M2RNNForCausalLM(M2RNNConfig.from_preset("tiny", num_experts=8, num_experts_per_tok=1))
    input_ids = torch.randint(3, 260, (1, 3))
    model.train()(input_ids=input_ids, labels=input_ids).loss.backward()
    experts = model.model.layers[3].mlp.experts
    grads = [expert.down_proj.weight.grad for expert in experts]
    assert all(grad is not None for grad in grads)
    assert sum(bool(grad.abs().sum() == 0) for grad in grads) >= 5  # 3 tokens reach at most 3 of 8 experts
    calls = []
    hooks = [expert.register_forward_hook(lambda *_: calls.append(1)) for expert in experts]
    with torch.no_grad():
        model.eval()(input_ids=input_ids)
    assert len(calls) <= 3
    for hook in hooks:
        hook.remove()
