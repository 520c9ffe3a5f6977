"""Fused linear cross-entropy (`m2rnn.losses`): the switch, its refusals, and loss and gradients equal to the plain
loss. Without CUDA liger-kernel's Triton kernels run in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

import subprocess
import sys

import pytest
import torch
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

import m2rnn.losses
from m2rnn import M2RNNConfig, M2RNNForCausalLM
from m2rnn.losses import apply_liger_kernel_to_m2rnn, fused_linear_cross_entropy, liger_available

needs_liger = pytest.mark.skipif(not liger_available(), reason="liger-kernel (in the dev extra) is not installed")


def _model(**overrides) -> M2RNNForCausalLM:
    torch.manual_seed(0)
    return M2RNNForCausalLM(M2RNNConfig.from_preset("tiny", **overrides)).train()


def _loss_and_grads(model: M2RNNForCausalLM, **batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    output = model(**batch)
    output.loss.backward()
    return output, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@needs_liger
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("num_items", [None, 23])
def test_fused_loss_and_gradients_equal_plain(tied, num_items):
    model = _model(tie_word_embeddings=tied)
    input_ids = torch.randint(3, 260, (2, 12))
    labels = input_ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[1, -1] = -100
    batch = dict(input_ids=input_ids, labels=labels)
    if num_items is not None:
        batch["num_items_in_batch"] = torch.tensor(num_items)  # the step's count over several micro-batches
    plain, plain_grads = _loss_and_grads(model, **batch)
    apply_liger_kernel_to_m2rnn(model)
    fused, fused_grads = _loss_and_grads(model, **batch)
    assert plain.logits is not None and fused.logits is None  # the full logits never exist
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@needs_liger
def test_fused_loss_packed_and_evaluation():
    """Packed rows (labels -100 at each document start) score the same targets; in eval mode, and with
    `skip_logits=False`, the model computes logits and the plain loss as before."""
    model = _model()
    documents = [{"input_ids": torch.randint(3, 260, (n,)).tolist()} for n in (5, 9, 4)]
    batch = DataCollatorWithFlattening(return_tensors="pt")(documents)
    plain = model(**batch).loss
    apply_liger_kernel_to_m2rnn(model)
    torch.testing.assert_close(model(**batch).loss, plain)
    evaluated = model.eval()(**batch)
    assert evaluated.logits is not None
    torch.testing.assert_close(evaluated.loss, plain)
    assert model.train()(**batch, skip_logits=False).logits is not None


@needs_liger
def test_fused_function_needs_labels_and_matches_mean_reduction():
    hidden, weight = torch.randn(1, 6, 8), torch.randn(20, 8)
    labels = torch.tensor([[1, 2, -100, 4, 5, 6]])
    logits = hidden @ weight.T
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(fused_linear_cross_entropy(hidden, weight, labels), expected)
    with pytest.raises(ValueError, match="pass labels or shift_labels"):
        fused_linear_cross_entropy(hidden, weight)


@needs_liger
def test_trainer_use_liger_kernel_applies_the_fused_loss(tmp_path, monkeypatch):
    """`TrainingArguments(use_liger_kernel=True)` reaches our model type through liger's table (registered when the
    model is built on a CUDA machine, faked here); two accumulated steps train to the same losses and weights as the
    plain loss."""
    documents = [{"input_ids": torch.randint(3, 260, (n,)).tolist()} for n in (7, 12, 5, 9, 11, 6, 8, 10)]
    trained = {}
    for use_liger in (False, True):
        with monkeypatch.context() as patch:
            patch.setattr(torch.cuda, "is_available", lambda: True)
            model = _model()
        args = TrainingArguments(
            tmp_path / str(use_liger), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
            learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
            use_liger_kernel=use_liger, seed=0, optim="sgd",  # Adam would magnify rounding in near-zero gradients
        )
        trainer = Trainer(model=model, args=args, train_dataset=documents, data_collator=DataCollatorWithFlattening())
        trainer.train()
        assert model.fused_linear_cross_entropy is use_liger
        trained[use_liger] = ([e["loss"] for e in trainer.state.log_history if "loss" in e], model.state_dict())
    assert trained[True][0] == pytest.approx(trained[False][0], rel=1e-5)
    for name, value in trained[False][1].items():
        torch.testing.assert_close(trained[True][1][name], value, rtol=1e-4, atol=1e-5, msg=name)


@needs_liger
def test_fused_loss_refused_without_cuda(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = _model()
    apply_liger_kernel_to_m2rnn(model)
    input_ids = torch.randint(3, 260, (1, 8))
    with pytest.raises(RuntimeError, match="runs on CUDA devices only, but the hidden states are on cpu"):
        model(input_ids=input_ids, labels=input_ids)
    apply_liger_kernel_to_m2rnn(model, fused_linear_cross_entropy=False)
    assert model(input_ids=input_ids, labels=input_ids).logits is not None


def test_fused_loss_refused_without_liger(monkeypatch):
    monkeypatch.setattr(m2rnn.losses, "liger_available", lambda: False)
    with pytest.raises(ImportError, match="needs liger-kernel, which is not installed: pip install liger-kernel"):
        apply_liger_kernel_to_m2rnn(_model())
    with pytest.raises(ValueError, match="cross_entropy=True"):
        apply_liger_kernel_to_m2rnn(_model(), fused_linear_cross_entropy=False, cross_entropy=True)
    with pytest.raises(TypeError, match="no M2RNNForCausalLM inside Linear"):
        apply_liger_kernel_to_m2rnn(torch.nn.Linear(2, 2), fused_linear_cross_entropy=False)


@needs_liger
def test_building_a_model_registers_with_liger_where_it_runs():
    """`import m2rnn` never imports liger-kernel; building a causal LM registers our model type in liger's table when
    CUDA is present (faked here) or liger is already imported, and skips the seconds-long import on a CPU-only machine."""
    code = (
        "import sys, torch, m2rnn; from m2rnn import M2RNNConfig, M2RNNForCausalLM; "
        "assert 'liger_kernel' not in sys.modules; "
        "M2RNNForCausalLM(M2RNNConfig.from_preset('tiny')); assert 'liger_kernel' not in sys.modules, 'cpu import'; "
        "torch.cuda.is_available = lambda: True; M2RNNForCausalLM(M2RNNConfig.from_preset('tiny')); "
        "from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN as table; "
        "from m2rnn.losses import apply_liger_kernel_to_m2rnn as fn; assert table['m2rnn'] is fn; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]