"""PEFT on every layer type: default targets, "all-linear", named lists, W through `target_parameters`, the
recurrent parameters through `modules_to_save`; adapters train, save, reload and merge with unchanged outputs."""

import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from m2rnn import M2RNNConfig, M2RNNForCausalLM
from m2rnn.training import (
    DEFAULT_LORA_TARGET_MODULES,
    LORA_TARGET_MODULES,
    STATE_WEIGHT_TARGET,
    lora_target_modules,
    merge_and_unload,
    recurrent_modules_to_save,
    register_peft_defaults,
)

# PEFT's table gets our defaults at `import m2rnn` only when PEFT came first; here other test modules may have
# imported m2rnn before PEFT, so register explicitly (the import orders are tested in subprocesses below)
register_peft_defaults()



def base_model(seed: int = 0) -> M2RNNForCausalLM:
    """The tiny preset: M2RNN, GDN and attention mixers, SwiGLU MLPs and one MoE layer with a gated shared expert."""
    torch.manual_seed(seed)
    model = M2RNNForCausalLM(M2RNNConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("state_weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def ids(seed: int = 1, batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs).logits


def adapted_suffixes(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}


def train_steps(model, steps: int = 3) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        batch = ids(seed=10 + step)
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


DEFAULT_TARGETS_CHECK = (
    "from m2rnn.training import DEFAULT_LORA_TARGET_MODULES\n"
    "model = m2rnn.M2RNNForCausalLM(m2rnn.M2RNNConfig.from_preset('tiny'))\n"
    "targets = get_peft_model(model, LoraConfig(r=2)).peft_config['default'].target_modules\n"
    "assert targets == set(DEFAULT_LORA_TARGET_MODULES), targets\n"
)


@pytest.mark.parametrize("order", [
    # PEFT imported first: `import m2rnn` fills in PEFT's per-model-type table
    "import peft, sys\nhooks = list(sys.meta_path)\nimport m2rnn\nassert sys.meta_path == hooks\n"
    "from peft import LoraConfig, get_peft_model\n",
    # m2rnn first: it neither imports PEFT nor hooks the import system; our helpers register on first use
    "import sys, torch, transformers\nhooks = list(sys.meta_path)\nimport m2rnn\n"
    "assert 'peft' not in sys.modules, 'import m2rnn imported peft'\nassert sys.meta_path == hooks\n"
    "from peft import LoraConfig, get_peft_model\n"
    "from m2rnn.training import lora_target_modules\nlora_target_modules(m2rnn.M2RNNConfig.from_preset('tiny'))\n",
    # m2rnn first, the model built before PEFT is imported, none of our helpers called: building it registers
    "import sys, torch, transformers\nimport m2rnn\nassert 'peft' not in sys.modules\n"
    "built = m2rnn.M2RNNForCausalLM(m2rnn.M2RNNConfig.from_preset('tiny'))\n"
    "from peft import LoraConfig, get_peft_model\n",
], ids=["peft-first", "m2rnn-first", "model-before-peft"])
def test_default_lora_targets_are_registered_without_an_import_hook(order):
    result = subprocess.run([sys.executable, "-c", order + DEFAULT_TARGETS_CHECK], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_broken_peft_install_does_not_stop_building_a_model(monkeypatch):
    import m2rnn.training

    def broken() -> None:
        raise ImportError("peft needs a newer transformers")

    monkeypatch.setattr(m2rnn.training, "register_peft_defaults", broken)
    with pytest.warns(UserWarning, match="could not register the default LoRA targets.*newer transformers"):
        model = M2RNNForCausalLM(M2RNNConfig.from_preset("tiny"))
    assert model.config.model_type == "m2rnn"


def test_default_lora_config_targets_every_mixer():
    model = get_peft_model(base_model(), LoraConfig(r=2))  # no target_modules: our registered defaults
    assert adapted_suffixes(model) == set(DEFAULT_LORA_TARGET_MODULES)
    adapted = {n.split(".mixer.")[0].rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"0", "1", "2", "3"}  # every layer: m2rnn, gated_deltanet, full_attention, m2rnn


def test_all_linear_finds_exactly_the_documented_names():
    model = base_model()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    assert adapted_suffixes(peft_model) == set(lora_target_modules(model.config))
    assert "lm_head" not in adapted_suffixes(peft_model)


@pytest.mark.parametrize("target", sorted({n for names in LORA_TARGET_MODULES.values() for n in names}))
def test_lora_on_each_named_module_changes_outputs(target):
    """A projection read as `module.weight` instead of called would bypass LoRA; every documented name must act."""
    base = base_model()
    inputs = ids()
    reference = logits(base, inputs)
    config = LoraConfig(r=2, target_modules=[target], init_lora_weights=False)  # random B: the delta is not zero
    model = get_peft_model(base, config)
    assert target in adapted_suffixes(model)
    assert (logits(model, inputs) - reference).abs().max() > 1e-4
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), reference)


def test_state_weight_through_target_parameters_changes_outputs_and_merges():
    base = base_model()
    inputs = ids()
    reference = logits(base, inputs)
    config = LoraConfig(r=2, target_parameters=[STATE_WEIGHT_TARGET], init_lora_weights=False)
    model = get_peft_model(base, config)
    wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "ParamWrapper"]
    assert len(wrapped) == 2  # the two M2RNN mixers are now ParamWrappers, not M2RNNMixer instances
    adapted = logits(model, inputs)
    assert (adapted - reference).abs().max() > 1e-3
    batch = ids(seed=3)
    model(batch, labels=batch).loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    # generation runs through the wrapped mixers' cache path
    prompt = ids(batch=1, length=4)
    generated = model.generate(prompt, max_new_tokens=5, do_sample=False)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, inputs), adapted, rtol=1e-5, atol=1e-5)
    assert merged.generate(prompt, max_new_tokens=5, do_sample=False).tolist() == generated.tolist()
    delta = merged.model.layers[0].mixer.state_weight - base_model().model.layers[0].mixer.state_weight
    assert delta.abs().max() > 1e-3  # the per-head delta was folded into W


def test_lora_trains_saves_reloads_and_merges(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", target_parameters=[STATE_WEIGHT_TARGET])
    model = get_peft_model(base_model(), config)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    train_steps(model)
    assert all((p - before[n]).abs().max() > 0 for n, p in model.named_parameters() if n in before)
    inputs = ids(seed=5)
    trained = logits(model, inputs)
    assert (trained - logits(base_model(), inputs)).abs().max() > 1e-3

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(base_model(), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(reloaded, inputs), trained, rtol=1e-6, atol=1e-6)

    merged = merge_and_unload(reloaded)  # PEFT's own leaves the mixers' in_proj/out_proj LoRA layers unmerged
    assert type(merged) is M2RNNForCausalLM and not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, inputs), trained, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    again = M2RNNForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(again, inputs), trained, rtol=1e-5, atol=1e-5)


def test_recurrent_parameters_train_through_modules_to_save(tmp_path):
    base = base_model()
    names = recurrent_modules_to_save(base)
    assert names == ["model.layers.0.mixer", "model.layers.1.mixer", "model.layers.3.mixer"]
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj", "gate_proj"], modules_to_save=names)
    model = get_peft_model(base, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for layer in (0, 1, 3):
        for parameter in ("A_log", "dt_bias", "conv1d.weight", "norm.weight"):
            assert any(f"layers.{layer}.mixer." in n and n.endswith(parameter) for n in trainable), (layer, parameter)
    assert any(n.endswith("layers.0.mixer.modules_to_save.default.D") for n in trainable)
    assert not any("layers.2.mixer.modules_to_save" in n for n in trainable)  # attention is not copied
    train_steps(model)
    inputs = ids(seed=6)
    trained = logits(model, inputs)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(base_model(), tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, inputs), trained, rtol=1e-6, atol=1e-6)
    a_log = reloaded.merge_and_unload().model.layers[0].mixer.A_log
    assert (a_log - base_model().model.layers[0].mixer.A_log).abs().max() > 0  # the trained copy came back


def test_recurrent_modules_to_save_refuses_unknown_kinds():
    with pytest.raises(ValueError, match="mixer_types has 'full_attention'"):
        recurrent_modules_to_save(base_model(), mixer_types=("full_attention",))
