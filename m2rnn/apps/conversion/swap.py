"""Replace Gated DeltaNet layers by M2RNN layers, in a config, a loaded model, or an import plan (streaming).

`init="fresh"`: the paper's init for the new layer (N(0, 0.02) projections, out_proj scaled by 1/√(2L),
A ~ U(A_init_range), dt ~ logU(dt_min, dt_max), W = I, D = 1, norm weight 1; docs/m2rnn-layer.md).

`init="transplant"`: the M2RNN layer gets the GDN layer's shape (q, k heads = GDN key heads of size DK; v, forget,
weight and gate heads = GDN value heads of size DV; same conv kernel) and reuses what maps:

| M2RNN tensor | taken from the GDN layer | note |
|---|---|---|
| `in_proj` rows `[q | k | v]` | `in_proj_qkv` | M2RNN does not l2-normalise or scale q, k |
| `in_proj` rows `x_f` (forget) | `in_proj_a` | same decay: f = exp(−exp(A_log)·softplus(x_f + dt_bias)) |
| `in_proj` rows `g` (output gate) | `in_proj_z` | same SiLU gate, but applied before the norm |
| `conv1d` | `conv1d` | same depthwise causal conv + SiLU over `[q | k | v]` |
| `A_log`, `dt_bias` | `A_log`, `dt_bias` | |
| `norm.weight` `[N·V]` | `norm.weight` `[DV]` tiled over the heads | M2RNN normalises all N·V values at once |
| `out_proj` | `out_proj` | |
| `state_weight` W | — | identity |
| `D` | — | ones (when `m2rnn_use_residual`) |

`in_proj_b` (the delta rule's β) has no counterpart and is dropped. The transplanted layer is a warm start, not an
equivalent layer: the recurrences differ. Every other layer is left untouched, bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from m2rnn.configuration_m2rnn import M2RNNConfig
from m2rnn.modeling_m2rnn import M2RNNForCausalLM, M2RNNMixer, M2RNNModel, M2RNNPreTrainedModel
from m2rnn.meta import expected_tensors

from .common import Getter, ImportPlan, TensorSpec
from .io import ConversionError

INITS = ("fresh", "transplant")
FP32_PARAMS = ("A_log", "dt_bias")


def gdn_shaped_m2rnn(config: M2RNNConfig) -> dict[str, Any]:
    """M2RNN head settings that give a layer the shape of the config's GDN layers (what transplant needs)."""
    key_heads, value_heads = config.linear_num_key_heads, config.linear_num_value_heads
    return dict(
        m2rnn_key_head_dim=config.linear_key_head_dim,
        m2rnn_value_head_dim=config.linear_value_head_dim,
        m2rnn_num_q_heads=key_heads,
        m2rnn_num_k_heads=key_heads,
        m2rnn_num_v_heads=value_heads,
        m2rnn_num_forget_heads=value_heads,
        m2rnn_num_weight_heads=value_heads,
        m2rnn_num_gate_heads=value_heads,
        m2rnn_conv_kernel_size=config.linear_conv_kernel_dim,
    )


def _check_request(config: M2RNNConfig, layers: Sequence[int], init: str) -> list[int]:
    if init not in INITS:
        raise ConversionError(f"swap_layers: init={init!r} must be one of {INITS}")
    layers = list(layers)
    if not layers:
        raise ConversionError("swap_layers: `layers` is empty")
    if len(set(layers)) != len(layers):
        raise ConversionError(f"swap_layers: `layers`={layers} repeats a layer")
    for i in layers:
        if not isinstance(i, int) or not 0 <= i < config.num_hidden_layers:
            raise ConversionError(f"swap_layers: layer {i!r} is outside 0..{config.num_hidden_layers - 1}")
        if config.mixer_types[i] != "gated_deltanet":
            raise ConversionError(
                f"swap_layers: layer {i} is {config.mixer_types[i]!r}; only 'gated_deltanet' layers can be swapped"
            )
    return layers


def _apply_swap(config: M2RNNConfig, layers: list[int], init: str, m2rnn_overrides: dict[str, Any]) -> None:
    """Turn `layers` of `config` (in place) into M2RNN layers and settle the M2RNN shape."""
    for key in m2rnn_overrides:
        if not key.startswith("m2rnn_") or not hasattr(config, key):
            raise ConversionError(f"swap_layers: {key!r} is not an M2RNN config option (m2rnn_*)")
    gdn_shape = gdn_shaped_m2rnn(config)
    if "m2rnn" in config.mixer_types:  # earlier swaps fixed the shape every M2RNN layer shares
        shape = {key: getattr(config, key) for key in gdn_shape}
        for key, value in m2rnn_overrides.items():
            if getattr(config, key) != value:
                raise ConversionError(
                    f"swap_layers: `{key}`={value!r} differs from the M2RNN layers already in the model "
                    f"({getattr(config, key)!r}); all M2RNN layers share one shape"
                )
    else:
        shape = {**gdn_shape, **m2rnn_overrides}
    if init == "transplant":
        for key, value in gdn_shape.items():
            if shape.get(key) != value:
                raise ConversionError(
                    f"swap_layers: init='transplant' needs `{key}`={value} (the GDN layer's shape), got {shape[key]!r}"
                )
    for key, value in {**shape, **m2rnn_overrides}.items():
        setattr(config, key, value)
    for i in layers:
        config.mixer_types[i] = "m2rnn"
        config.layer_types[i] = "linear_attention"
    config._validate()


def swapped_config(
    config: M2RNNConfig, layers: Sequence[int], init: str = "fresh", **m2rnn_overrides: Any
) -> M2RNNConfig:
    """A copy of `config` whose `layers` are M2RNN layers."""
    layers = _check_request(config, layers, init)
    config = copy.deepcopy(config)
    _apply_swap(config, layers, init, m2rnn_overrides)
    return config


# ---------------------------------------------------------------------------------------------------------------
# The new layer's tensors
# ---------------------------------------------------------------------------------------------------------------
def transplant_state(gdn: dict[str, torch.Tensor], config: M2RNNConfig) -> dict[str, torch.Tensor]:
    """M2RNN mixer tensors (names relative to the mixer) from a GDN mixer's, as the module docstring's table says."""
    heads, value_dim = config.m2rnn_num_heads, config.m2rnn_value_head_dim
    dtype = gdn["out_proj.weight"].dtype
    state = {
        "in_proj.weight": torch.cat([gdn["in_proj_qkv.weight"], gdn["in_proj_a.weight"], gdn["in_proj_z.weight"]]),
        "conv1d.weight": gdn["conv1d.weight"].clone(),
        "A_log": gdn["A_log"].float().clone(),
        "dt_bias": gdn["dt_bias"].float().clone(),
        "state_weight": torch.eye(value_dim, dtype=dtype).expand(config.m2rnn_num_weight_heads, -1, -1).clone(),
        "norm.weight": gdn["norm.weight"].repeat(heads),
        "out_proj.weight": gdn["out_proj.weight"].clone(),
    }
    if config.m2rnn_use_residual:
        state["D"] = torch.ones(heads, value_dim, dtype=dtype)
    return state


def fresh_state(config: M2RNNConfig, layer_idx: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """M2RNN mixer tensors with the paper's init (the model's own `_init_weights`), seeded by (seed, layer)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100_003 + layer_idx)
        mixer = M2RNNMixer(config, layer_idx)
        initializer = M2RNNPreTrainedModel(config)
        for module in mixer.modules():
            initializer._init_weights(module)
    return {name: tensor.detach() for name, tensor in mixer.state_dict().items()}


def _new_layer_state(
    config: M2RNNConfig, layer_idx: int, init: str, seed: int, gdn: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    return transplant_state(gdn, config) if init == "transplant" else fresh_state(config, layer_idx, seed)


# ---------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------
def swap_layers(
    model_or_config: M2RNNForCausalLM | M2RNNModel | M2RNNConfig,
    layers: Sequence[int],
    init: str = "fresh",
    seed: int = 0,
    **m2rnn_overrides: Any,
):
    """Replace the mixer of `layers` (Gated DeltaNet layers) by M2RNN; their `mixer_types` entries become "m2rnn".

    With a config, returns a new config. With a model, swaps in place (same device; the model's dtype, with
    `A_log`/`dt_bias` in float32) and returns the model. `m2rnn_overrides` (e.g. `m2rnn_num_v_heads=...`) set the
    M2RNN shape for `init="fresh"`; by default the new layer takes the replaced GDN layer's shape.
    """
    if isinstance(model_or_config, M2RNNConfig):
        return swapped_config(model_or_config, layers, init, **m2rnn_overrides)
    model = model_or_config
    config = model.config
    layers = _check_request(config, layers, init)
    decoder = model.model if isinstance(model, M2RNNForCausalLM) else model
    _apply_swap(config, layers, init, m2rnn_overrides)
    for i in layers:
        layer = decoder.layers[i]
        old = layer.mixer
        weight = old.out_proj.weight
        gdn = {name: tensor.detach().cpu() for name, tensor in old.state_dict().items()}
        state = _new_layer_state(config, i, init, seed, gdn)
        state = {
            name: t.to(weight.device, torch.float32 if name in FP32_PARAMS else weight.dtype) for name, t in state.items()
        }
        with torch.device("meta"):
            new = M2RNNMixer(config, i)
        new.load_state_dict(state, assign=True)
        new.train(old.training)
        layer.mixer = new
        layer.mixer_type = "m2rnn"
    return model


def swap_plan(
    plan: ImportPlan, layers: Sequence[int], init: str = "fresh", seed: int = 0, **m2rnn_overrides: Any
) -> ImportPlan:
    """The same swap on an import plan, so that a streaming conversion writes the swapped model directly."""
    config = swapped_config(plan.config, layers, init, **m2rnn_overrides)
    tensors = dict(plan.tensors)
    names = list(expected_tensors(config))
    for i in layers:
        prefix = f"model.layers.{i}.mixer."
        gdn_specs = {n[len(prefix) :]: tensors.pop(n) for n in list(tensors) if n.startswith(prefix)}
        sources = tuple(s for spec in gdn_specs.values() for s in spec.sources) if init == "transplant" else ()
        build = _layer_builder(config, i, init, seed, gdn_specs)
        for name in names:
            if name.startswith(prefix):
                tensors[name] = TensorSpec(sources, lambda get, name=name[len(prefix) :], build=build: build(get, name))
    tensors = {name: tensors[name] for name in names}  # the model's order, layer by layer
    notes = plan.notes + [f"swapped layers {list(layers)} ({init})"]
    return ImportPlan(config, tensors, plan.ignored_prefixes, notes, plan.source_model_type)


def _layer_builder(config: M2RNNConfig, layer_idx: int, init: str, seed: int, gdn_specs: dict[str, TensorSpec]):
    """A `(get, name) -> tensor` for one new layer that computes the layer once and hands its tensors out."""
    pending: dict[str, torch.Tensor] = {}

    def build(get: Getter, name: str) -> torch.Tensor:
        if name not in pending:
            gdn = {n: spec.build(get) for n, spec in gdn_specs.items()} if init == "transplant" else None
            pending.clear()
            pending.update(_new_layer_state(config, layer_idx, init, seed, gdn))
        return pending.pop(name)

    return build
