"""Short causal conv: full conv, packed sequences, decode steps against the conv state, gradients (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m2rnn.kernels.short_conv import causal_conv1d, causal_conv1d_step


def reference(x: torch.Tensor, weight: torch.Tensor, activation: str | None = "silu") -> torch.Tensor:
    width = weight.shape[-1]
    y = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), groups=x.shape[1])
    return F.silu(y) if activation == "silu" else y


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("width", [1, 4])
def test_matches_left_padded_conv1d(activation, width):
    x, weight = torch.randn(2, 6, 11), torch.randn(6, width)
    torch.testing.assert_close(causal_conv1d(x, weight, activation=activation), reference(x, weight, activation))


def test_accepts_nn_conv1d_weight_layout():
    x, weight = torch.randn(1, 6, 9), torch.randn(6, 1, 4)
    torch.testing.assert_close(causal_conv1d(x, weight), reference(x, weight.squeeze(1)))


def test_cu_seqlens_equals_per_sequence_calls():
    lengths = [1, 5, 2, 9]  # shorter and longer than the kernel
    x, weight = torch.randn(1, 6, sum(lengths)), torch.randn(6, 4)
    cu_seqlens = torch.tensor([0, 1, 6, 8, 17], dtype=torch.int32)
    expected = torch.cat([reference(part, weight) for part in x.split(lengths, dim=-1)], dim=-1)
    torch.testing.assert_close(causal_conv1d(x, weight, cu_seqlens=cu_seqlens), expected)
    assert not torch.allclose(causal_conv1d(x, weight), expected)  # the boundary reset matters here


def test_step_by_step_decode_equals_full_conv():
    x, weight = torch.randn(2, 6, 10), torch.randn(6, 4)
    full = causal_conv1d(x, weight)
    prefix = 3
    # Prefill state as transformers' update_conv_state stores it: the last Kc inputs, left-padded with zeros.
    conv_state = F.pad(x[..., :prefix], (4 - prefix, 0)).clone()
    steps = [causal_conv1d_step(x[..., t], conv_state, weight) for t in range(prefix, 10)]
    torch.testing.assert_close(torch.stack(steps, dim=-1), full[..., prefix:])
    torch.testing.assert_close(conv_state, x[..., -4:])


def test_step_updates_in_place():
    conv_state = torch.zeros(1, 2, 3)
    pointer = conv_state.data_ptr()
    causal_conv1d_step(torch.tensor([[1.0, 2.0]]), conv_state, torch.ones(2, 3), activation=None)
    y = causal_conv1d_step(torch.tensor([[3.0, 4.0]]), conv_state, torch.ones(2, 3), activation=None)
    assert conv_state.data_ptr() == pointer
    torch.testing.assert_close(conv_state, torch.tensor([[[0.0, 1.0, 3.0], [0.0, 2.0, 4.0]]]))
    torch.testing.assert_close(y, torch.tensor([[4.0, 6.0]]))


@pytest.mark.parametrize("packed", [False, True])
def test_gradients_flow_and_match_reference(packed):
    x = torch.randn(1, 4, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    cu_seqlens = torch.tensor([0, 5, 12], dtype=torch.int32) if packed else None
    torch.autograd.gradcheck(lambda a, b: causal_conv1d(a, b, cu_seqlens=cu_seqlens), (x, weight))


def test_bfloat16_output_dtype():
    x, weight = torch.randn(1, 8, 7, dtype=torch.bfloat16), torch.randn(8, 4, dtype=torch.bfloat16)
    y = causal_conv1d(x, weight)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference(x.float(), weight.float()), atol=2e-2, rtol=2e-2)


def test_errors_name_the_argument():
    x = torch.randn(2, 6, 5)
    with pytest.raises(ValueError, match="x must be"):
        causal_conv1d(x[0], torch.randn(6, 4))
    with pytest.raises(ValueError, match="weight must be"):
        causal_conv1d(x, torch.randn(5, 4))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, torch.randn(6, 4), activation="relu")
    with pytest.raises(ValueError, match="batch size 1"):
        causal_conv1d(x, torch.randn(6, 4), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0, never decrease and end at T=5"):
        causal_conv1d(x[:1], torch.randn(6, 4), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="conv_state must be"):
        causal_conv1d_step(x[..., 0], torch.zeros(2, 6, 3), torch.randn(6, 4))
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        causal_conv1d(x, torch.randn(6, 4), backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        causal_conv1d(x, torch.randn(6, 4), backend="triton")


@pytest.mark.parametrize("bounds", [[0, 4, 2, 5], [0, 6, -1, 5], [2, 3, 5], [0, 3, 6]])
def test_cu_seqlens_must_start_at_zero_increase_and_end_at_t(bounds):
    """[0, 4, 2, 5] runs 0..T but goes back: the packed conv would give the taps of a negative-length document."""
    x = torch.randn(1, 6, 5)
    with pytest.raises(ValueError, match=r"never decrease and end at T=5, got \[" + ", ".join(map(str, bounds))):
        causal_conv1d(x, torch.randn(6, 4), cu_seqlens=torch.tensor(bounds, dtype=torch.int32))
