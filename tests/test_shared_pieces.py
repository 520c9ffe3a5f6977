"""The pieces several parts share, each with one home: the training loop and its schedule (S3 training, healing),
the meta-device model (conversion, folder checks, cards) and the LoRA target table (PEFT defaults, healing, cards)."""

import math

import pytest
import torch

from m2rnn import M2RNNConfig, M2RNNForCausalLM
from m2rnn.apps.training_loop import Schedule, train_loop
from m2rnn.meta import count_parameters, expected_tensors, meta_model
from m2rnn.training import DEFAULT_LORA_TARGET_MODULES, LORA_TARGET_MODULES, default_lora_targets


def test_schedule_warms_up_then_decays_to_its_floor():
    schedule = Schedule(100, warmup=10, floor=0.1)
    assert [schedule(i) for i in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert schedule(10) == 1.0 and schedule(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert schedule(100) == pytest.approx(0.1) and schedule(500) == pytest.approx(0.1)  # stays at the floor
    assert [Schedule(10, warmup=4, decay="constant")(i) for i in (0, 3, 9)] == [0.25, 1.0, 1.0]
    assert Schedule(10, warmup=5, warmup_from=0.1)(0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="decay='linear'"):
        Schedule(10, decay="linear")
    with pytest.raises(ValueError, match="steps=0"):
        Schedule(0)


def test_train_loop_applies_the_schedule_clips_and_can_stop_early():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    schedule = Schedule(8, warmup=2, floor=0.0)
    inputs = torch.randn(16, 4)
    seen = []
    for done in train_loop(model, optimizer, schedule, lambda step: 1e6 * model(inputs).square().mean(),
                           max_grad_norm=1e-3, progress=False):
        seen.append((done.index, done.lr))
        grad_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        assert grad_norm <= 1e-3 * (1 + 1e-5)  # clipped from a huge loss
        if done.index == 4:
            break
    assert seen == [(i, 0.5 * schedule(i)) for i in range(5)]
    assert optimizer.param_groups[0]["lr"] == 0.5 and not model.training  # restored, left in eval mode


def test_meta_model_has_every_shape_and_no_memory():
    config = M2RNNConfig.from_preset("tiny")
    model = M2RNNForCausalLM(config)
    assert all(p.is_meta for p in meta_model(config).parameters())
    saved = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert expected_tensors(config, keep_tied=True) == saved
    tied = config.tie_word_embeddings
    assert ("lm_head.weight" in expected_tensors(config)) == (not tied)
    assert count_parameters(config) == model.num_parameters()


def test_one_lora_table_serves_peft_healing_and_cards():
    from m2rnn.apps.heal.healing import DEFAULT_LORA_TARGETS
    from m2rnn.model_card import render_model_card

    assert default_lora_targets() == list(DEFAULT_LORA_TARGET_MODULES)
    assert set(DEFAULT_LORA_TARGETS) == set(DEFAULT_LORA_TARGET_MODULES) | set(LORA_TARGET_MODULES["mlp"])
    assert default_lora_targets(["m2rnn"]) == ["in_proj", "out_proj"]
    config = M2RNNConfig.from_preset("tiny")
    card = str(render_model_card(config, num_parameters=1))
    expected = sorted(default_lora_targets(config.mixer_types, mlp=True))
    assert f"target_modules={expected}".replace("'", '"') in card
