"""`Trainer` out of the box: the loss falls, gradient accumulation counts tokens (num_items_in_batch), gradient
checkpointing replays the layers, bf16 autocast runs on CPU, and the result saves and reloads."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening, Trainer, TrainingArguments

from m2rnn import M2RNNConfig, M2RNNForCausalLM



def make_model(seed: int = 0) -> M2RNNForCausalLM:
    torch.manual_seed(seed)
    return M2RNNForCausalLM(M2RNNConfig.from_preset("tiny"))


def pad_collator(features: list[dict]) -> dict[str, torch.Tensor]:
    """Right padding with an attention mask; labels are the ids with -100 on padding and on any given mask."""
    width = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": torch.zeros(len(features), width, dtype=torch.long)}
    batch["attention_mask"] = torch.zeros_like(batch["input_ids"])
    batch["labels"] = torch.full_like(batch["input_ids"], -100)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(f["input_ids"])
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, :n] = torch.tensor(f.get("labels", f["input_ids"]))
    return batch


def arguments(tmp_path, **overrides) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=1,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    return TrainingArguments(**(defaults | overrides))


def pattern_documents(count: int) -> list[dict]:
    """Short periodic documents: easy to learn, so a few steps make the loss fall."""
    return [{"input_ids": [1] + [10 + (i + j) % 7 for j in range(15)]} for i in range(count)]


def test_trainer_lowers_the_loss_with_packing_and_checkpointing_then_saves(tmp_path):
    model = make_model()
    replays = []
    model.model.layers[0].mixer.register_forward_hook(lambda *_: replays.append(1))
    args = arguments(tmp_path, max_steps=12, gradient_checkpointing=True)
    trainer = Trainer(model, args, train_dataset=pattern_documents(16), data_collator=DataCollatorWithFlattening())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and losses[-1] < 0.6 * losses[0], losses
    assert model.model.layers[0].gradient_checkpointing
    assert len(replays) == 2 * 12  # checkpointing runs each layer's forward again in backward

    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert type(reloaded) is M2RNNForCausalLM
    ids = torch.tensor([pattern_documents(1)[0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


# uneven lengths and masked prompts: the two halves of the batch hold very different numbers of targets
UNEVEN = [
    {"input_ids": list(range(3, 23)), "labels": [-100] * 4 + list(range(7, 23))},
    {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
    {"input_ids": list(range(30, 61)), "labels": list(range(30, 61))},
    {"input_ids": [9, 10, 11], "labels": [9, 10, 11]},
]


def one_sgd_step(tmp_path, batch_size: int, accumulation: int, collator) -> tuple[float, dict[str, torch.Tensor]]:
    model = make_model(seed=3)
    args = arguments(
        tmp_path, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        optim="sgd", learning_rate=0.5, max_grad_norm=1e9, train_sampling_strategy="sequential",
    )
    trainer = Trainer(model, args, train_dataset=UNEVEN, data_collator=collator)
    trainer.train()
    loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return loss, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gradient_accumulation_equals_the_big_batch(tmp_path, packed):
    collator = DataCollatorWithFlattening() if packed else pad_collator
    big_loss, big_params = one_sgd_step(tmp_path, batch_size=4, accumulation=1, collator=collator)
    accumulated_loss, accumulated_params = one_sgd_step(tmp_path, batch_size=2, accumulation=2, collator=collator)
    assert accumulated_loss == pytest.approx(big_loss, rel=1e-4)
    start = make_model(seed=3).state_dict()
    moved = 0
    for name, param in big_params.items():
        torch.testing.assert_close(accumulated_params[name], param, rtol=1e-4, atol=1e-6, msg=name)
        moved += int(not torch.equal(param, start[name]))
    assert moved > 20

    # the test has teeth: these micro-batches hold 18 and 33 targets, so averaging their mean losses (what a
    # forward that ignored num_items_in_batch would give) moves the weights differently
    model = make_model(seed=3)
    halves = [collator(UNEVEN[:2]), collator(UNEVEN[2:])]  # the sequential sampler's micro-batches
    naive = sum(model(**half).loss / 2 for half in halves)
    naive_grads = torch.autograd.grad(naive, list(model.parameters()), allow_unused=True)
    model.zero_grad()
    exact = model(**collator(UNEVEN)).loss
    assert exact.item() == pytest.approx(big_loss, rel=1e-4)
    exact_grads = torch.autograd.grad(exact, list(model.parameters()), allow_unused=True)
    gap = max(
        ((a - b).norm() / b.norm()).item()
        for a, b in zip(naive_grads, exact_grads) if b is not None and b.norm() > 0
    )
    assert gap > 0.05


def test_bf16_mixed_precision_on_cpu(tmp_path):
    """Trainer accepts `bf16=True` on CPU and runs the forward under bf16 autocast; master weights stay fp32."""
    model = make_model()
    dtypes = set()
    model.model.layers[0].mixer.in_proj.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    args = arguments(tmp_path, max_steps=3, bf16=True)
    trainer = Trainer(model, args, train_dataset=pattern_documents(12), data_collator=DataCollatorWithFlattening())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
