"""FSDP2 (`fully_shard` per decoder layer, then the root: what accelerate's FSDP2 config does) on two CPU processes
over gloo: steps equal one process with the same global batch, a sharded checkpoint resumes as if never stopped and
consolidates (`m2rnn.apps.distributed`) into a Hub folder that loads with and without the package, packed batches
give the padded loss, and activation checkpointing as accelerate's FSDP2 config applies it
(`fsdp_activation_checkpointing: true`) gives the same steps."""

import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

from m2rnn import M2RNNConfig, M2RNNForCausalLM
from m2rnn.apps.distributed import SHARDED_MODEL_FOLDER, SHARDED_MODEL_KEY, consolidate_checkpoint
from m2rnn.apps.hub import load_without_package
from m2rnn.modeling_m2rnn import M2RNNDecoderLayer
from test_ddp import WORLD_SIZE, spawn

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"
STEPS, SAVE_AT, DOCS_PER_PROCESS = 4, 2, 2


def _finetune_example():
    spec = importlib.util.spec_from_file_location("finetune_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model() -> M2RNNForCausalLM:
    torch.manual_seed(0)
    return M2RNNForCausalLM(M2RNNConfig.from_preset("tiny")).train()


def _optimizer(model) -> torch.optim.Optimizer:
    """SGD with momentum: optimizer state to save and resume, and linear in the gradients (Adam would magnify the
    rounding differences of near-zero gradients between one and two processes)."""
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _global_batches() -> list[list[dict]]:
    """STEPS global batches of WORLD_SIZE * DOCS_PER_PROCESS documents of different lengths."""
    documents = _finetune_example().random_documents(STEPS * WORLD_SIZE * DOCS_PER_PROCESS, 24, 260, seed=1)
    size = WORLD_SIZE * DOCS_PER_PROCESS
    return [documents[i : i + size] for i in range(0, len(documents), size)]


def _train(model, optimizer, batches, steps, rank, world_size, collator) -> list[float]:
    """Token-exact data parallelism as in examples/finetune.py: sum over my targets / all targets of the step."""
    losses = []
    for documents in batches[steps]:
        mine = documents[rank * DOCS_PER_PROCESS : (rank + 1) * DOCS_PER_PROCESS] if world_size > 1 else documents
        total = sum(len(d["input_ids"]) - 1 for d in documents)
        loss = model(**collator(mine), num_items_in_batch=torch.tensor(total)).loss
        (loss * world_size).backward()  # FSDP averages gradients over processes
        optimizer.step()
        optimizer.zero_grad()
        detached = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(detached)
        losses.append(detached.item())
    return losses


def _sharded(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def _checkpointed(model):
    """Every decoder layer recomputed in backward, wrapped as accelerate does under `fsdp_activation_checkpointing`."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper,
    )

    wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper,
                                   check_fn=lambda module: isinstance(module, M2RNNDecoderLayer))
    return model


def _worker(rank: int, out: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    out = Path(out)
    batches, packed = _global_batches(), DataCollatorWithFlattening(return_tensors="pt")
    padded = _finetune_example().pad_documents(pad_token_id=0)
    result = {}

    model = _sharded(_model())
    optimizer = _optimizer(model)  # before any forward: the root stays unsharded after
    with torch.no_grad():
        for name, collator in (("packed", packed), ("padded", padded)):
            mine = batches[0][rank * DOCS_PER_PROCESS : (rank + 1) * DOCS_PER_PROCESS]
            result[f"{name}_loss"] = model(**collator(mine)).loss.item()
    result["losses"] = _train(model, optimizer, batches, slice(0, SAVE_AT), rank, WORLD_SIZE, packed)
    checkpoint = out / "checkpoint"
    model_state, optimizer_state = get_state_dict(model, optimizer)
    # accelerate's save_state layout under FSDP2 with SHARDED_STATE_DICT (optimizer beside it)
    dcp.save({SHARDED_MODEL_KEY: model_state}, checkpoint_id=checkpoint / SHARDED_MODEL_FOLDER)
    dcp.save({"optimizer": optimizer_state}, checkpoint_id=checkpoint / "optimizer_0")
    if rank == 0:
        model.config.save_pretrained(checkpoint)
    result["losses"] += _train(model, optimizer, batches, slice(SAVE_AT, STEPS), rank, WORLD_SIZE, packed)
    final = {name: value.full_tensor() for name, value in model.state_dict().items()}

    resumed = _sharded(M2RNNForCausalLM(M2RNNConfig.from_preset("tiny")).train())  # another initialisation
    resumed_optimizer = _optimizer(resumed)
    model_state, optimizer_state = get_state_dict(resumed, resumed_optimizer)
    dcp.load({SHARDED_MODEL_KEY: model_state}, checkpoint_id=checkpoint / SHARDED_MODEL_FOLDER)
    dcp.load({"optimizer": optimizer_state}, checkpoint_id=checkpoint / "optimizer_0")
    set_state_dict(resumed, resumed_optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    result["resumed_losses"] = _train(resumed, resumed_optimizer, batches, slice(SAVE_AT, STEPS), rank, WORLD_SIZE,
                                      packed)
    resumed_final = {name: value.full_tensor() for name, value in resumed.state_dict().items()}
    result["resumed_equal"] = all(torch.equal(resumed_final[name], value) for name, value in final.items())

    checkpointed = _checkpointed(_model())
    result["checkpoint_wrapped_layers"] = sum(type(m).__name__ == "CheckpointWrapper" for m in checkpointed.modules())
    checkpointed = _sharded(checkpointed)
    result["checkpointed_losses"] = _train(checkpointed, _optimizer(checkpointed), batches, slice(0, STEPS), rank,
                                           WORLD_SIZE, packed)
    if rank == 0:
        torch.save(final, out / "final.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    spawn(_worker, str(out))
    return out, [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def test_fsdp2_steps_equal_one_process(fsdp_run):
    out, results = fsdp_run
    model = _model()
    optimizer = _optimizer(model)
    collator = DataCollatorWithFlattening(return_tensors="pt")
    reference = _train(model, optimizer, _global_batches(), slice(0, STEPS), 0, 1, collator)
    assert results[0]["losses"] == results[1]["losses"]
    assert results[0]["losses"] == pytest.approx(reference, rel=1e-5)
    final = torch.load(out / "final.pt")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(final[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp2_sharded_checkpoint_resumes_exactly(fsdp_run):
    _, results = fsdp_run
    for result in results:
        assert result["resumed_losses"] == result["losses"][SAVE_AT:]
        assert result["resumed_equal"]


def test_fsdp2_packed_loss_equals_padded(fsdp_run):
    _, results = fsdp_run
    for result in results:
        assert result["packed_loss"] == pytest.approx(result["padded_loss"], rel=1e-5)


def test_fsdp2_activation_checkpointing_gives_the_same_steps(fsdp_run):
    _, results = fsdp_run
    layers = M2RNNConfig.from_preset("tiny").num_hidden_layers
    for result in results:
        assert result["checkpoint_wrapped_layers"] == layers
        assert result["checkpointed_losses"] == pytest.approx(result["losses"], rel=1e-6)


def test_sharded_checkpoint_consolidates_to_a_hub_folder(fsdp_run, tmp_path):
    """The checkpoint written by two processes becomes a folder that `from_pretrained` loads with the package and,
    through its flat code and auto_map, without it."""
    out, _ = fsdp_run
    folder = consolidate_checkpoint(out / "checkpoint", tmp_path / "hub")
    assert (folder / "model.safetensors").is_file() and (folder / "modeling_m2rnn.py").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_m2rnn.M2RNNForCausalLM"
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    model = _model()
    optimizer = _optimizer(model)
    _train(model, optimizer, _global_batches(), slice(0, SAVE_AT), 0, 1, DataCollatorWithFlattening(return_tensors="pt"))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
    input_ids = [[5, 17, 200, 42]]
    with torch.no_grad():
        logits = loaded(torch.tensor(input_ids)).logits
    torch.testing.assert_close(load_without_package(folder, input_ids), logits)


def test_consolidate_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        consolidate_checkpoint(tmp_path, tmp_path / "out")
    M2RNNConfig.from_preset("tiny").save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither pytorch_model_fsdp_0/ nor model.safetensors"):
        consolidate_checkpoint(tmp_path, tmp_path / "out")
