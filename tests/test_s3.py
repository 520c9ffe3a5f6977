"""S3 engine: the group, the data, evaluation against an oracle and a constant model, and a short training run."""

from __future__ import annotations

import itertools

import pytest
import torch

from m2rnn.eval import s3


def test_elements_are_the_six_permutations_with_identity_first():
    assert sorted(s3.ELEMENTS) == sorted(itertools.permutations(range(3)))
    assert s3.ELEMENTS[s3.IDENTITY] == (0, 1, 2) and s3.IDENTITY == 0


def test_composition_table_is_explicit_composition_and_a_group():
    table = s3.TABLE
    for a, b in itertools.product(range(6), repeat=2):
        pa, pb = s3.ELEMENTS[a], s3.ELEMENTS[b]
        assert s3.ELEMENTS[table[a, b]] == tuple(pa[pb[i]] for i in range(3))
    assert all(sorted(row.tolist()) == list(range(6)) for row in table)  # Latin square
    assert not torch.equal(table, table.T)  # S3 is not abelian


def test_running_products_match_explicit_permutation_composition():
    generator = torch.Generator().manual_seed(0)
    inputs, targets = s3.sample_batch(16, 20, generator)
    for row in range(16):
        p = (0, 1, 2)
        for t in range(20):
            x = s3.ELEMENTS[inputs[row, t]]
            p = tuple(x[p[i]] for i in range(3))  # p_t = x_t ∘ p_{t-1}
            assert s3.ELEMENTS[targets[row, t]] == p


def test_sample_batch_is_seeded():
    a = s3.sample_batch(4, 8, torch.Generator().manual_seed(3))
    b = s3.sample_batch(4, 8, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].min() >= 0 and a[0].max() < 6


def test_element_names():
    assert s3.element_name(s3.IDENTITY) == "e"
    names = ["e", "(0 1)", "(0 2)", "(1 2)", "(0 1 2)", "(0 2 1)"]
    assert sorted(s3.element_name(i) for i in range(6)) == sorted(names)


def test_oracle_scores_100_percent():
    results = s3.evaluate_s3(s3.OracleS3(vocab_size=8), [1, 5, 64], num_samples=40, seed=0, batch_size=16)
    for r in results.values():
        assert r == {"accuracy": 1.0, "last_accuracy": 1.0}


class _Constant(torch.nn.Module):
    """Always predicts the identity."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor([5.0, 0, 0, 0, 0, 0]))

    def forward(self, input_ids):
        return s3._Output(self.bias.expand(*input_ids.shape, 6))


def test_constant_model_scores_about_chance():
    results = s3.evaluate_s3(_Constant(), [32], num_samples=512, seed=0)
    assert abs(results[32]["accuracy"] - 1 / 6) < 0.03
    assert abs(results[32]["last_accuracy"] - 1 / 6) < 0.06


def test_curriculum_and_schedules():
    assert s3.curriculum_lengths("doubling", 32) == [4, 8, 16, 32]
    assert s3.curriculum_lengths(None, 12) == [12]
    assert s3.curriculum_lengths([2, 6], 6) == [2, 6]
    with pytest.raises(ValueError, match="curriculum"):
        s3.curriculum_lengths([0], 4)
    for schedule in ("constant", "cosine", "onecycle"):
        lrs = [s3.lr_at(i, 100, 1e-3, schedule, 10) for i in range(100)]
        assert max(lrs) <= 1e-3 + 1e-12 and min(lrs) > 0
    with pytest.raises(ValueError, match="schedule"):
        s3.lr_at(0, 10, 1e-3, "linear", 0)


def test_table_and_plot(tmp_path):
    results = {"oracle": {4: {"accuracy": 1.0, "last_accuracy": 1.0}, 8: {"accuracy": 0.5, "last_accuracy": 0.25}}}
    table = s3.results_table(results, train_length=4)
    assert "| oracle | 100.0 / 100.0 | 50.0 / 25.0 |" in table and "4 (train)" in table
    path = s3.plot_s3(results, tmp_path / "plot.png", train_length=4)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def tiny_m2rnn():
    from m2rnn import M2RNNConfig, M2RNNForCausalLM

    torch.manual_seed(0)
    config = M2RNNConfig(
        vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, mixer_types=["m2rnn"],
        m2rnn_key_head_dim=8, m2rnn_value_head_dim=8, m2rnn_num_v_heads=4, m2rnn_num_forget_heads=4,
        m2rnn_num_weight_heads=4, m2rnn_num_gate_heads=4,
    )
    return M2RNNForCausalLM(config)


def test_tiny_m2rnn_trained_for_a_few_steps_beats_chance():
    torch.set_num_threads(1)
    model = tiny_m2rnn()
    history = s3.train_s3(model, train_length=4, steps=60, batch_size=32, lr=1e-2, schedule="constant",
                          curriculum=None, warmup=5, seed=0, progress=False)
    assert len(history.steps) == 6 and history.seconds > 0
    results = s3.evaluate_s3(model, [4], num_samples=256, seed=99)
    # Position 1 is a copy and position 2 one product: a few steps learn those, chance is 1/6.
    assert results[4]["accuracy"] > 0.3, results
