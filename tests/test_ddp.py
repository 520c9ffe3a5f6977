"""Data parallelism through accelerate: two CPU processes on gloo run `examples/finetune.py` (DDP, packed batches,
gradient accumulation) and keep bit-identical weights while each sees different documents."""

import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from m2rnn import M2RNNForCausalLM

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"
WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    result = finetune.main([
        "--cpu", "--max-steps", "3", "--accumulation", "2", "--batch-size", "2", "--max-length", "32",
        "--lr", "1e-2", "--check-replicas", "--output-dir", str(Path(out) / "model"),
    ])
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
