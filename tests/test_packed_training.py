"""Padding-free training: `DataCollatorWithFlattening` batches give the same logits, loss and gradients as padded
batches, because every layer type (M2RNN, Gated DeltaNet, attention) stays within each packed document; rows
rounded up by `PackedCollator`'s padding document give them too."""

import pytest
import torch
from transformers import DataCollatorWithFlattening

from m2rnn import M2RNNConfig, M2RNNForCausalLM
from m2rnn.training import PackedCollator, pad_packed_row

SMALL = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48,
    m2rnn_key_head_dim=8, m2rnn_value_head_dim=4, m2rnn_num_v_heads=4, m2rnn_num_forget_heads=4,
    m2rnn_num_weight_heads=4, m2rnn_num_gate_heads=4,
    linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_parameters={"rope_theta": 100.0},
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
HYBRID = ["m2rnn", "gated_deltanet", "full_attention", "m2rnn"]
LENGTHS = [7, 3, 11, 5]
# the collator's three ways of marking documents: restarting positions, cu_seq_lens (+ positions), cu_seq_lens alone
COLLATORS = {
    "position_ids": dict(),
    "cu_seq_lens": dict(return_flash_attn_kwargs=True),
    "cu_seq_lens_only": dict(return_flash_attn_kwargs=True, return_position_ids=False),
}



def make_model(mixer_types: list[str], attn_implementation: str = "sdpa", seed: int = 0) -> M2RNNForCausalLM:
    torch.manual_seed(seed)
    config = M2RNNConfig(
        num_hidden_layers=len(mixer_types), mixer_types=mixer_types, attn_implementation=attn_implementation, **SMALL
    )
    model = M2RNNForCausalLM(config)
    with torch.no_grad():  # move W and D off identity / ones so that they act
        for name, p in model.named_parameters():
            if name.endswith(("state_weight", ".D")):
                p.add_(0.2 * torch.randn_like(p))
    return model


def documents(seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, SMALL["vocab_size"], (n,), generator=generator).tolist() for n in LENGTHS]


def padded_batch(docs: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded rows, attention mask, labels with -100 on padding."""
    width = max(map(len, docs))
    input_ids = torch.zeros(len(docs), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, doc in enumerate(docs):
        input_ids[i, : len(doc)] = torch.tensor(doc)
        attention_mask[i, : len(doc)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def packed_batch(docs: list[list[int]], mode: str) -> dict[str, torch.Tensor]:
    return DataCollatorWithFlattening(**COLLATORS[mode])([{"input_ids": doc} for doc in docs])


def loss_and_grads(model: M2RNNForCausalLM, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", list(COLLATORS))
def test_packed_logits_equal_separate_documents(mode, attn_implementation):
    model = make_model(HYBRID, attn_implementation).eval()
    docs = documents()
    batch = packed_batch(docs, mode)
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch).logits  # config default use_cache=True: packing must still be detected
        separate = torch.cat([model(torch.tensor([doc])).logits for doc in docs], dim=1)
    torch.testing.assert_close(packed, separate, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mixer", ["m2rnn", "gated_deltanet", "full_attention"])
def test_each_layer_type_restarts_at_document_boundaries(mixer):
    """One layer type at a time, so that a layer which leaks across documents cannot hide behind another."""
    model = make_model([mixer]).eval()
    docs = documents(seed=1)
    for mode in COLLATORS:
        batch = packed_batch(docs, mode)
        batch.pop("labels")
        with torch.no_grad():
            packed = model(**batch).logits[0]
            start = 0
            for doc in docs:
                alone = model(torch.tensor([doc])).logits[0]
                torch.testing.assert_close(packed[start : start + len(doc)], alone, rtol=1e-4, atol=1e-5)
                start += len(doc)


@pytest.mark.parametrize("mode", list(COLLATORS))
def test_packed_loss_and_gradients_equal_padded(mode):
    model = make_model(HYBRID).train()
    docs = documents(seed=2)
    padded_loss, padded_grads = loss_and_grads(model, padded_batch(docs))
    packed = packed_batch(docs, mode)
    # the collator masks each document's first label, so no target crosses a boundary: n - 1 targets per document
    assert (packed["labels"][:, 1:] != -100).sum() == sum(n - 1 for n in LENGTHS)
    packed_loss, packed_grads = loss_and_grads(model, packed)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    recurrent = [n for n in padded_grads if n.endswith(("state_weight", "A_log", "in_proj_qkv.weight", "q_proj.weight"))]
    assert len(recurrent) >= 4 and all(padded_grads[n].abs().sum() > 0 for n in recurrent)


def test_cu_seq_lens_need_one_packed_row():
    model = make_model(HYBRID).eval()
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_q.*2 rows"):
        model(torch.randint(3, 60, (2, 6)), cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=3, max_length_k=3)


@pytest.mark.parametrize("mode", list(COLLATORS))
def test_rows_rounded_up_by_a_padding_document_keep_loss_and_gradients(mode):
    """`PackedCollator` (and `pad_packed_row`) append one padding document: the same loss and gradients as the
    exact-length row, for every way of marking documents."""
    model = make_model(HYBRID).train()
    docs = documents(seed=3)
    exact = packed_batch(docs, mode)
    rounded = PackedCollator(**COLLATORS[mode], pad_to_multiple_of=16)([{"input_ids": doc} for doc in docs])
    total = sum(LENGTHS)
    assert rounded["input_ids"].shape == (1, 32) and total == 26
    assert (rounded["labels"][0, total:] == -100).all()
    if "position_ids" in rounded:
        assert rounded["position_ids"][0, total:].tolist() == list(range(6))
    if "cu_seq_lens_q" in rounded:
        assert rounded["cu_seq_lens_q"].tolist() == [0, 7, 10, 21, 26, 32]
        assert rounded["max_length_q"] == max(LENGTHS)
    exact_loss, exact_grads = loss_and_grads(model, exact)
    rounded_loss, rounded_grads = loss_and_grads(model, rounded)
    torch.testing.assert_close(rounded_loss, exact_loss, rtol=1e-5, atol=1e-6)
    for name, grad in exact_grads.items():
        torch.testing.assert_close(rounded_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_pad_packed_row_leaves_its_input_alone_and_checks_it():
    batch = packed_batch(documents(), "cu_seq_lens")
    before = {key: value.clone() if torch.is_tensor(value) else value for key, value in batch.items()}
    assert pad_packed_row(batch, 13, pad_token_id=0)["input_ids"].shape == (1, 26)  # already a multiple
    padded = pad_packed_row(batch, 8, pad_token_id=0)
    assert padded["input_ids"].shape == (1, 32) and padded["cu_seq_lens_k"][-1] == 32
    for key, value in before.items():
        assert torch.equal(batch[key], value) if torch.is_tensor(value) else batch[key] == value, key
    with pytest.raises(ValueError, match="multiple must be >= 1, got 0"):
        pad_packed_row(batch, 0, pad_token_id=0)
    with pytest.raises(ValueError, match=r"one packed row.*\(2, 6\)"):
        pad_packed_row({"input_ids": torch.zeros(2, 6, dtype=torch.long)}, 8, pad_token_id=0)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be >= 1 or None, got 0"):
        PackedCollator(pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="return_tensors must be 'pt', got 'np'"):
        PackedCollator(return_tensors="np")
    unrounded = PackedCollator(pad_to_multiple_of=None)([{"input_ids": doc} for doc in documents()])
    assert unrounded["input_ids"].shape == (1, 26)
