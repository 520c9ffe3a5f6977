"""Data-parallel `m2rnn eval` (`m2rnn.apps.eval.distributed`): prompts split across processes in the groups a one-process
run forms, outputs gathered back in order; under torchrun on two CPU processes (gloo) `m2rnn eval niah` writes, from
rank 0 alone, the results a one-process run writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2rnn import M2RNNConfig, M2RNNForCausalLM
from m2rnn.apps.eval.distributed import DataParallelGenerator, merge, shard
from m2rnn.tokenization import byte_level_tokenizer
from test_ddp import WORLD_SIZE, spawn

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINT = Path(sys.executable).with_name("m2rnn")
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_shards_form_the_one_process_groups(count, batch_size):
    items = list(range(11))
    one_process = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    many = []
    for start in range(0, len(items), count * batch_size):  # the command's loop, with the global batch size
        group = items[start : start + count * batch_size]
        shards = [shard(group, index, batch_size) for index in range(count)]
        assert merge(shards) == group
        many += [part for part in shards if part]
    assert many == one_process


def _record(prompts, max_new_tokens, stop_at_newline):
    return [f"{os.environ['RANK']}:{prompt}:{max_new_tokens}" for prompt in prompts]


def _generator_worker(rank: int, out: str) -> None:
    generate = DataParallelGenerator(_record, batch_size=2)
    outputs = [generate([f"p{i}" for i in range(n)], 5) for n in (4, 3, 1)]
    if rank == 0:
        Path(out, "outputs.json").write_text(json.dumps(outputs))


def test_generator_splits_and_gathers_over_gloo(tmp_path):
    spawn(_generator_worker, str(tmp_path))
    assert json.loads((tmp_path / "outputs.json").read_text()) == [
        ["0:p0:5", "0:p1:5", "1:p2:5", "1:p3:5"],
        ["0:p0:5", "0:p1:5", "1:p2:5"],
        ["0:p0:5"],
    ]
    with pytest.raises(ValueError, match="5 prompts in one call, more than 1 processes x batch size 2"):
        DataParallelGenerator(_record, batch_size=2)([f"p{i}" for i in range(5)], 5)


def test_niah_under_torchrun_equals_one_process(tmp_path):
    torch.manual_seed(0)
    config = M2RNNConfig.from_preset("tiny", vocab_size=260, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    M2RNNForCausalLM(config).save_pretrained(tmp_path / "model")
    byte_level_tokenizer().save_pretrained(tmp_path / "model")
    options = ["eval", "niah", str(tmp_path / "model"), "--tasks", "single_1", "--lengths", "512",
               "--depths", "0,0.5,1", "--limit", "1", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([str(ENTRY_POINT), *options, "--output-dir", str(tmp_path / "one")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    parallel = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", str(WORLD_SIZE), str(ENTRY_POINT), *options,
         "--output-dir", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    assert parallel.stdout.count("results: ") == 1  # rank 0 alone reports
    one, two = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two"))
    assert len(one["examples"]) == 3
    assert two["examples"] == one["examples"] and two["cells"] == one["cells"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "one", "two"]  # no staging or rank-1 folder
