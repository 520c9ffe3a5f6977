"""The model checks packed boundaries once per forward and tells the ops not to re-read values (one host sync per
forward on CUDA instead of one per layer and op); the public ops still check what a user passes them."""

from __future__ import annotations

import pytest
import torch

import m2rnn.mixers_m2rnn as mixers
from m2rnn import M2RNNConfig, M2RNNForCausalLM
from m2rnn.kernels import causal_conv1d, gated_delta_rule, m2rnn_recurrence


def _model() -> M2RNNForCausalLM:
    torch.manual_seed(0)
    return M2RNNForCausalLM(M2RNNConfig.from_preset("tiny")).eval()


def test_model_refuses_bad_cu_seq_lens_q_by_name():
    ids = torch.randint(3, 200, (1, 10))
    bad = torch.tensor([0, 6, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_q.*never decrease"):
        _model()(ids, cu_seq_lens_q=bad)


def test_model_layers_do_not_recheck_values(monkeypatch):
    seen = []
    for name in ("m2rnn_recurrence", "gated_delta_rule", "causal_conv1d"):
        original = getattr(mixers, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            seen.append((_name, kwargs.get("check_values", True)))
            return _original(*args, **kwargs)

        monkeypatch.setattr(mixers, name, spy)
    ids = torch.randint(3, 200, (1, 10))
    _model()(ids, cu_seq_lens_q=torch.tensor([0, 4, 10], dtype=torch.int32))
    _model()(torch.randint(3, 200, (2, 6)))
    assert {name for name, _ in seen} == {"m2rnn_recurrence", "gated_delta_rule", "causal_conv1d"}
    assert all(check is False for _, check in seen)


def test_public_ops_check_values_unless_told_not_to():
    torch.manual_seed(0)
    T, N, K, V = 10, 2, 4, 3
    q, k, v = torch.randn(T, N, K), torch.randn(T, N, K), torch.randn(T, N, V)
    weight, forget = torch.randn(N, V, V), torch.rand(T, N)
    bad = torch.tensor([0, 6, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        m2rnn_recurrence(q, k, v, weight, forget, cu_seqlens=bad, backend="torch")
    with pytest.raises(ValueError, match="forget gates"):
        m2rnn_recurrence(q[None], k[None], v[None], weight, forget[None] + 1.5, backend="torch")
    x = torch.randn(1, 8, T)
    with pytest.raises(ValueError, match="cu_seqlens"):
        causal_conv1d(x, torch.randn(8, 4), cu_seqlens=bad)
    qg, kg, vg = torch.randn(1, T, 2, 4), torch.randn(1, T, 2, 4), torch.randn(1, T, 2, 4)
    g, beta = -torch.rand(1, T, 2), torch.rand(1, T, 2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        gated_delta_rule(qg, kg, vg, g, beta, cu_seqlens=bad, backend="torch")
    good = torch.tensor([0, 4, 10], dtype=torch.int32)
    y, _ = m2rnn_recurrence(q, k, v, weight, forget, cu_seqlens=good, backend="torch", check_values=False)
    assert y.shape == (T, N, V)
