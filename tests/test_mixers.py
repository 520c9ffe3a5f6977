"""The recurrent mixers, called directly: one base (`RecurrentMixer`) runs padding, the short conv and the cache
modes for both, so every mode gives the plain run of the real tokens, for M2RNN and Gated DeltaNet alike."""

import pytest
import torch
from transformers import DynamicCache

from m2rnn import M2RNNCache, M2RNNConfig, M2RNNForCausalLM
from m2rnn.mixers_m2rnn import M2RNNGatedDeltaNet, M2RNNMixer, RecurrentMixer
from test_modeling import SMALL

MIXERS = {
    "m2rnn": dict(mixer_types=["m2rnn"]),
    "m2rnn_without_forget_gate": dict(mixer_types=["m2rnn"], m2rnn_use_forget_gate=False),
    "gated_deltanet": dict(mixer_types=["gated_deltanet"]),
    "gated_deltanet_without_conv_or_gates": dict(
        mixer_types=["gated_deltanet"], linear_use_short_conv=False, linear_use_decay_gate=False,
        linear_use_output_gate=False, linear_allow_neg_eigval=True,
    ),
}


def mixer_config(name: str) -> M2RNNConfig:
    return M2RNNConfig(num_hidden_layers=1, **SMALL, **MIXERS[name])


def make_mixer(name: str) -> tuple[RecurrentMixer, M2RNNConfig]:
    torch.manual_seed(0)
    config = mixer_config(name)
    model = M2RNNForCausalLM(config).eval()
    with torch.no_grad():  # W and D off their identity/ones init, so that they act
        for param_name, p in model.named_parameters():
            if param_name.endswith(("state_weight", ".D")):
                p.add_(0.2 * torch.randn_like(p))
    return model.model.layers[0].mixer, config


def hidden(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, SMALL["hidden_size"], generator=torch.Generator().manual_seed(seed))


def test_both_mixers_run_on_the_base():
    """Each mixer supplies projections, gates, ops and output; `forward` (modes, padding, conv, cache) is the base's."""
    for cls in (M2RNNMixer, M2RNNGatedDeltaNet):
        assert issubclass(cls, RecurrentMixer)
        assert "forward" not in vars(cls) and "short_conv" not in vars(cls)
        assert {"project", "gates", "recurrence", "step", "output"} <= set(vars(cls))


@pytest.mark.parametrize("name", list(MIXERS))
@torch.no_grad()
def test_padded_rows_equal_the_rows_alone(name):
    """Left and right padding, with NaN in the padded positions: the real positions see only their own tokens."""
    mixer, _ = make_mixer(name)
    x = hidden(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    x = x.masked_fill(~mask.bool()[..., None], float("nan"))
    padded = mixer(x, attention_mask=mask)
    torch.testing.assert_close(padded[0, 3:], mixer(x[:1, 3:])[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded[1, :7], mixer(x[1:, :7])[0], rtol=1e-5, atol=1e-6)
    assert not padded[mask.bool()].isnan().any()


@pytest.mark.parametrize("name", list(MIXERS))
@torch.no_grad()
def test_prefill_resume_and_decode_equal_one_run(name):
    """Prefill 5 tokens, resume with a chunk of 3, decode 2 one at a time: the cached states carry the sequence."""
    mixer, config = make_mixer(name)
    x = hidden(2, 10)
    full = mixer(x)
    for cache in (DynamicCache(config=config), M2RNNCache(config)):
        parts = [mixer(x[:, :5], past_key_values=cache), mixer(x[:, 5:8], past_key_values=cache)]
        parts += [mixer(x[:, t : t + 1], past_key_values=cache) for t in (8, 9)]
        torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(MIXERS))
@torch.no_grad()
def test_packed_documents_equal_separate_runs(name):
    mixer, _ = make_mixer(name)
    x = hidden(1, 11)
    cu_seqlens = torch.tensor([0, 4, 11], dtype=torch.int32)
    packed = mixer(x, cu_seqlens=cu_seqlens)
    separate = torch.cat([mixer(x[:, :4]), mixer(x[:, 4:])], dim=1)
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="packed documents .* never cached"):
        mixer(x, cu_seqlens=cu_seqlens, past_key_values=M2RNNCache(mixer_config(name)))
