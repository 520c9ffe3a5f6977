"""`from_pretrained` of our classes is strict by default: a checkpoint with missing, extra or reshaped weights raises
a ValueError naming them (transformers alone logs a LOAD REPORT and runs with random weights); `strict=False` opts out."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

from m2rnn import M2RNNConfig, M2RNNForCausalLM, M2RNNModel


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    M2RNNForCausalLM(M2RNNConfig.from_preset("tiny")).save_pretrained(folder)
    return folder


def edited_copy(saved, target, edit):
    """`saved` with its weights passed through `edit` (a function of the state dict)."""
    for file in saved.iterdir():
        if file.is_file():
            (target / file.name).write_bytes(file.read_bytes())
    weights = load_file(saved / "model.safetensors")
    edit(weights)
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("loader", [M2RNNForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained])
def test_missing_weights_raise_and_name_the_keys(saved, tmp_path, loader):
    folder = edited_copy(saved, tmp_path, lambda w: w.pop("model.layers.0.mixer.A_log"))
    with pytest.raises(ValueError, match=r"missing from the checkpoint: model\.layers\.0\.mixer\.A_log.*strict=False"):
        loader(folder)
    model, info = loader(folder, strict=False, output_loading_info=True)
    assert isinstance(model, M2RNNForCausalLM) and info["missing_keys"] == {"model.layers.0.mixer.A_log"}


def test_unexpected_weights_raise(saved, tmp_path):
    folder = edited_copy(saved, tmp_path, lambda w: w.update({"model.layers.9.mixer.D": torch.ones(4, 8)}))
    with pytest.raises(ValueError, match=r"in the checkpoint but not in the model: model\.layers\.9\.mixer\.D"):
        AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(AutoModelForCausalLM.from_pretrained(folder, strict=False), M2RNNForCausalLM)


def test_mismatched_shapes_raise_and_name_both_shapes(saved, tmp_path):
    folder = edited_copy(saved, tmp_path, lambda w: w.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match=r"of another shape: model\.norm\.weight \(3,\) vs model \(64,\)"):
        M2RNNForCausalLM.from_pretrained(folder)
    model = M2RNNForCausalLM.from_pretrained(folder, ignore_mismatched_sizes=True)  # the explicit opt-in still works
    assert model.model.norm.weight.shape == (64,)


def test_exact_checkpoints_load_and_the_base_model_leaves_the_head(saved):
    model, info = M2RNNForCausalLM.from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(AutoModel.from_pretrained(saved)) is M2RNNModel
