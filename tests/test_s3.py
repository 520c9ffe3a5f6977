"""S3 engine: the group, the data, evaluation against an oracle and a constant model, and a short training run."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from m2rnn.apps.eval import s3


class OracleS3(torch.nn.Module):
    """Logits that put all mass on the true running product: evaluation's 100% reference."""

    def __init__(self, vocab_size: int = s3.NUM_ELEMENTS) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        products = s3.running_products(input_ids)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(products, self.vocab_size).float() * 10.0 + self.dummy)


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
    expected = {"sequence_accuracy": 1.0, "accuracy": 1.0, "last_accuracy": 1.0}
    results = s3.evaluate_s3(OracleS3(vocab_size=8), [1, 5, 64], num_samples=40, seed=0, batch_size=16)
    assert all(r == expected for r in results.values())
    prefixes = s3.evaluate_s3_prefixes(OracleS3(vocab_size=8), [4, 64], num_samples=30, seed=0, batch_size=7)
    assert prefixes == {4: expected, 64: expected}


def test_cumulative_sequence_accuracy_on_hand_made_hits():
    hits = torch.tensor([
        [1, 1, 1, 1],  # right throughout
        [1, 0, 1, 1],  # one miss at t = 2: the sequence counts as lost from t = 2 on, although later hits recover
        [0, 1, 1, 1],  # lost from the start
        [1, 1, 1, 0],  # lost at the last position only
    ], dtype=torch.bool)
    torch.testing.assert_close(s3.cumulative_sequence_accuracy(hits), torch.tensor([0.75, 0.5, 0.5, 0.25]))
    metrics = s3.hit_metrics(hits, [1, 2, 4])
    assert metrics[2] == {"sequence_accuracy": 0.5, "accuracy": 0.75, "last_accuracy": 0.75}
    assert metrics[4]["sequence_accuracy"] == 0.25 and metrics[4]["last_accuracy"] == 0.75
    assert metrics[4]["accuracy"] == 13 / 16
    with pytest.raises(ValueError, match="length 5"):
        s3.hit_metrics(hits, [5])


class _ForgetsAfter(torch.nn.Module):
    """The oracle up to position `horizon`, then always the identity: per-token accuracy stays near chance after
    it, but cumulative sequence accuracy drops to (about) 0."""

    def __init__(self, horizon: int) -> None:
        super().__init__()
        self.horizon, self.oracle = horizon, OracleS3()

    def forward(self, input_ids):
        logits = self.oracle(input_ids).logits.clone()
        logits[:, self.horizon :] = torch.tensor([10.0, 0, 0, 0, 0, 0])
        return SimpleNamespace(logits=logits)


def test_prefix_evaluation_reads_lengths_from_the_same_sequences():
    results = s3.evaluate_s3_prefixes(_ForgetsAfter(8), [8, 16, 64], num_samples=200, seed=0)
    assert results[8]["sequence_accuracy"] == 1.0
    assert results[64]["sequence_accuracy"] <= results[16]["sequence_accuracy"] < 0.05
    assert results[64]["last_accuracy"] > 0.08  # chance-level per-token hits, yet the sequences are lost


class _Constant(torch.nn.Module):
    """Always predicts the identity."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor([5.0, 0, 0, 0, 0, 0]))

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, 6))


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
        factors = [s3.s3_schedule(schedule, 100, 10)(i) for i in range(100)]
        assert max(factors) <= 1 + 1e-12 and min(factors) > 0
    cosine = s3.s3_schedule("cosine", 100, 10)
    assert cosine(0) == 0.1 and cosine(9) == 1.0 and cosine(10) == 1.0 and cosine(100) == pytest.approx(0.05)
    onecycle = s3.s3_schedule("onecycle", 100, 10)
    assert onecycle(0) == pytest.approx(0.1) and onecycle(30) == 1.0 and onecycle(100) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="schedule"):
        s3.s3_schedule("linear", 10, 0)


def test_table_and_plot(tmp_path):
    results = {"oracle": {4: {"accuracy": 1.0, "last_accuracy": 1.0}, 8: {"accuracy": 0.5, "last_accuracy": 0.25}}}
    table = s3.results_table(results, train_length=4)
    assert "| oracle | **–** (100.0 / 100.0) | **–** (50.0 / 25.0) |" in table and "4 (train)" in table  # no sequence key
    results["oracle"][8]["sequence_accuracy"] = 0.125
    assert "**12.5** (50.0 / 25.0)" in s3.results_table(results)
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


def test_fixed_dataset_training_draws_only_from_the_fixed_set(monkeypatch):
    seen = []

    class Spy(OracleS3):
        def forward(self, input_ids):
            seen.append(input_ids.clone())
            return super().forward(input_ids)

    s3.train_s3(Spy(), train_length=6, steps=7, batch_size=4, curriculum=None, advance_at=None, dataset_size=10,
                seed=3, progress=False, warmup=1)
    data, _ = s3.sample_fixed_dataset(10, 6, seed=3)
    rows = {tuple(r) for r in data.tolist()}
    batches = [tuple(r) for batch in seen for r in batch.tolist()]
    assert len(batches) == 28 and set(batches) <= rows and len(set(batches)) == 10  # epochs of 2 batches, reshuffled
    with pytest.raises(ValueError, match="dataset_size"):
        s3.train_s3(Spy(), train_length=6, steps=1, batch_size=4, dataset_size=3, progress=False)


# ---------------------------------------------------------------------------------------------------- models


def test_harness_gdn_builds_one_layer_without_conv_or_gates(monkeypatch):
    from m2rnn import mixers_m2rnn
    from m2rnn.apps.s3_models import build_model, harness_gdn_config

    model = build_model(harness_gdn_config(), seed=0)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.linear_num_value_heads) == (1, 128, 8)
    assert (config.linear_key_head_dim, config.linear_value_head_dim) == (32, 32)
    mixer = model.model.layers[0].mixer
    assert isinstance(mixer, mixers_m2rnn.M2RNNGatedDeltaNet)
    assert mixer.conv1d is None and mixer.in_proj_a is None and mixer.A_log is None and mixer.dt_bias is None
    assert mixer.in_proj_z is None and mixer.beta_scale == 2.0
    assert not any("conv" in name or "proj_a" in name or "proj_z" in name for name, _ in model.named_parameters())

    captured = {}
    real = mixers_m2rnn.gated_delta_rule

    def spy(q, k, v, g, beta, *args, **kwargs):
        captured.update(q=q, g=g, beta=beta)
        return real(q, k, v, g, beta, *args, **kwargs)

    monkeypatch.setattr(mixers_m2rnn, "gated_delta_rule", spy)
    x = torch.randint(0, 6, (2, 9))
    model(x)
    hidden = model.model.embed_tokens(x)
    hidden = model.model.layers[0].input_layernorm(hidden)
    qkv = torch.nn.functional.silu(mixer.in_proj_qkv(hidden))  # no conv: SiLU alone
    torch.testing.assert_close(captured["q"], qkv[..., :256].reshape(2, 9, 8, 32))
    assert torch.equal(captured["g"], torch.zeros_like(captured["g"]))  # no decay gate
    torch.testing.assert_close(captured["beta"], 2 * torch.sigmoid(mixer.in_proj_b(hidden)))


def _m2rnn(**options):
    from m2rnn import M2RNNConfig, M2RNNForCausalLM

    torch.manual_seed(0)
    config = M2RNNConfig(
        vocab_size=8, hidden_size=64, intermediate_size=64, num_hidden_layers=1, mixer_types=["m2rnn"],
        m2rnn_key_head_dim=8, m2rnn_value_head_dim=16, m2rnn_num_v_heads=4, m2rnn_num_forget_heads=4,
        m2rnn_num_weight_heads=4, m2rnn_num_gate_heads=4, **options,
    )
    return M2RNNForCausalLM(config)


def _capture_recurrence(monkeypatch, model):
    from m2rnn import mixers_m2rnn

    captured = {}
    real = mixers_m2rnn.m2rnn_recurrence

    def spy(q, k, v, weight, forget, *args, **kwargs):
        captured.update(q=q, k=k, v=v, forget=forget)
        return real(q, k, v, weight, forget, *args, **kwargs)

    monkeypatch.setattr(mixers_m2rnn, "m2rnn_recurrence", spy)
    x = torch.randint(0, 6, (2, 7))
    model(x)
    return captured, model.model.layers[0].input_layernorm(model.model.embed_tokens(x))


def test_state_weight_inits():
    eye = torch.eye(16).expand(4, 16, 16)
    assert torch.equal(_m2rnn().model.layers[0].mixer.state_weight.detach(), eye)  # the paper's default
    w = _m2rnn(m2rnn_state_weight_init="orthogonal").model.layers[0].mixer.state_weight.detach().double()
    torch.testing.assert_close(w @ w.transpose(-1, -2), eye.double(), atol=1e-6, rtol=0)  # each head orthogonal
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w, eye.double())
    w = _m2rnn(m2rnn_state_weight_init="normal").model.layers[0].mixer.state_weight.detach()
    assert abs(w.std().item() - 0.25) < 0.03 and abs(w.mean().item()) < 0.03  # N(0, 1/V), V = 16


def test_forget_gate_off_gives_zero_forget_in_the_op(monkeypatch):
    model = _m2rnn(m2rnn_use_forget_gate=False)
    mixer = model.model.layers[0].mixer
    assert mixer.A_log is None and mixer.dt_bias is None
    assert mixer.in_proj.out_features == (8 + 8 + 4 * 16) + 4 * 16  # no x_f rows
    captured, _ = _capture_recurrence(monkeypatch, model)
    assert captured["forget"].shape == (2, 7, 4) and torch.equal(captured["forget"], torch.zeros(2, 7, 4))
    gated, _ = _capture_recurrence(monkeypatch, _m2rnn())
    assert (gated["forget"] > 0.5).all()  # with the gate (the default) f is near 1 at init


def test_input_scale_and_identity_conv(monkeypatch):
    model = _m2rnn(m2rnn_in_proj_init_std=0.125, m2rnn_conv_init="identity")
    mixer = model.model.layers[0].mixer
    assert abs(mixer.in_proj.weight.std().item() - 0.125) < 0.01
    assert abs(_m2rnn().model.layers[0].mixer.in_proj.weight.std().item() - 0.02) < 0.003
    captured, hidden = _capture_recurrence(monkeypatch, model)
    qkv = torch.nn.functional.silu(mixer.in_proj(hidden)[..., : mixer.conv_dim])  # the conv passes x_t through
    torch.testing.assert_close(captured["k"], qkv[..., 8:16].reshape(2, 7, 1, 8))
    torch.testing.assert_close(captured["v"], qkv[..., 16:].reshape(2, 7, 4, 16))


@pytest.mark.parametrize("key, value", [("m2rnn_state_weight_init", "eye"), ("m2rnn_conv_init", "zeros"),
                                        ("m2rnn_in_proj_init_std", 0.0), ("m2rnn_use_forget_gate", "no"),
                                        ("linear_use_short_conv", 0)])
def test_init_options_reject_bad_values(key, value):
    from m2rnn import M2RNNConfig

    with pytest.raises(ValueError, match=key):
        M2RNNConfig(**{key: value})


def test_lm_presets_keep_the_paper_init():
    from m2rnn import M2RNNConfig

    config = M2RNNConfig.from_preset("hybrid-m2rnn-400m")
    assert config.m2rnn_state_weight_init == "identity" and config.m2rnn_use_forget_gate
    assert config.m2rnn_in_proj_init_std is None and config.m2rnn_conv_init == "normal"
