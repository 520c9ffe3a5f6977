"""Model-level speed of the 400M hybrids against a same-size Llama: training, prefill, decode, peak memory.

    python benchmarks/bench_model.py                       # everything, one GPU, bf16 (about 4-6 minutes on an H100)
    python benchmarks/bench_model.py --quick               # 4K training, 4K prefill, decode after 1K tokens
    python benchmarks/bench_model.py --only decode --models hybrid-m2rnn,llama --contexts 1024
    python benchmarks/bench_model.py --device cpu --preset-scale tiny --output-dir /tmp/b   # CPU smoke run, seconds
    python benchmarks/bench_model.py --fla-unguarded --only train --models hybrid-gdn,hybrid-gdn-m2rnn-1l --quick

`--fla-unguarded` lifts fla 0.6's refusal of its gated backward on Hopper with Triton 3.4-3.7.0 (fla #640: that
Triton miscompiles one backward kernel, so the gradients are wrong) FOR TIMING ONLY: the GDN layers then train
with fla's real kernels, which is what the one-layer-swap cost must be measured against; the results say so.

Models: the presets `hybrid-gdn-400m`, `hybrid-gdn-m2rnn-1l-400m`, `hybrid-m2rnn-400m` and a transformers
`LlamaForCausalLM` with the same width, depth, vocabulary and (to within 0.5%) parameter count as the GDN hybrid.
All run in bf16 (parameters and AdamW states; no fp32 master copy) with sdpa attention.

Measurements (each one isolated: the peak memory column is the peak of that measurement alone):
- train: tokens/s of forward + backward + AdamW step at each context (batch = `--train-tokens` / context,
  halved on out-of-memory until it fits);
- prefill: seconds for one forward of 1 × context tokens that fills the cache (`logits_to_keep=1`);
- decode: tokens/s (summed over the batch) after `context` tokens, with `generate`'s eager loop and our cache
  ("eager"), and with `m2rnn.generation.StaticDecoder` ("fast": the step captured in a CUDA graph on CUDA). The
  context is made by prefilling 16 real tokens and then extending every attention layer's key/value cache to the
  context length (the recurrent layers' cost does not depend on it), which times decode without paying for a
  32K × 32 prefill.

A measurement that runs out of memory is recorded as "OOM" and the next one runs; `--time-budget` skips what is
left once the budget is spent. Results go to `<output-dir>/model_results.{md,json,png}`; the JSON is rewritten
after every measurement, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

from m2rnn import M2RNNConfig, M2RNNForCausalLM
from m2rnn.generation import StaticDecoder

MODELS = {  # name in the tables: M2RNN preset (None = the Llama baseline)
    "hybrid-gdn": "hybrid-gdn-400m",
    "hybrid-gdn-m2rnn-1l": "hybrid-gdn-m2rnn-1l-400m",
    "hybrid-m2rnn": "hybrid-m2rnn-400m",
    "llama": None,
}
MEASUREMENTS = ("train", "prefill", "decode")
DEFAULTS = {  # per scale: train contexts, prefill lengths, decode contexts, decode batches, tokens per train step
    "400m": dict(train=[4096, 16384], prefill=[4096, 32768], decode=[1024, 32768], batches=[1, 32], tokens=32768),
    "tiny": dict(train=[64, 128], prefill=[64, 256], decode=[32, 128], batches=[1, 4], tokens=256),
}
QUICK = dict(train=[4096], prefill=[4096], decode=[1024])
TINY_OVERRIDES = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    m2rnn_key_head_dim=16, m2rnn_value_head_dim=8, m2rnn_num_v_heads=4, m2rnn_num_forget_heads=4,
    m2rnn_num_weight_heads=4, m2rnn_num_gate_heads=4,
    linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
    num_attention_heads=4, num_key_value_heads=4, head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
DECODE_PROMPT = 16


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
def m2rnn_config(preset: str, scale: str) -> M2RNNConfig:
    """The preset, or at tiny scale the same mixer pattern on 4 layers (every 6th layer: 0, 6, 12, 18)."""
    if scale == "400m":
        return M2RNNConfig.from_preset(preset)
    mixers = M2RNNConfig.from_preset(preset).mixer_types[::6]
    return M2RNNConfig.from_preset(preset, mixer_types=mixers, **TINY_OVERRIDES)


def count_parameters(build: Callable[[], torch.nn.Module]) -> int:
    """Parameters of the model `build` makes, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())


def llama_config(reference: M2RNNConfig) -> LlamaConfig:
    """A Llama as wide and deep as `reference`, its MLP width chosen so that the parameter counts match."""

    def make(intermediate: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=reference.vocab_size, hidden_size=reference.hidden_size, intermediate_size=intermediate,
            num_hidden_layers=reference.num_hidden_layers, num_attention_heads=reference.num_attention_heads,
            num_key_value_heads=reference.num_key_value_heads, head_dim=reference.head_dim,
            max_position_embeddings=65536, tie_word_embeddings=reference.tie_word_embeddings,
            bos_token_id=reference.bos_token_id, eos_token_id=reference.eos_token_id,
            pad_token_id=reference.pad_token_id,
        )

    target = count_parameters(lambda: M2RNNForCausalLM(reference))
    low, high = (count_parameters(lambda i=i: AutoModelForCausalLM.from_config(make(i))) for i in (256, 512))
    per_unit = (high - low) / 256
    multiple = 64 if reference.hidden_size >= 512 else 8  # kernel-friendly widths at full size
    intermediate = max(multiple, round((256 + (target - low) / per_unit) / multiple) * multiple)
    return make(intermediate)


def build_model(name: str, scale: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    preset = MODELS[name]
    reference = m2rnn_config(preset or "hybrid-gdn-400m", scale)
    config = reference if preset is not None else llama_config(reference)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------------------------
class Clock:
    """Wall-clock timing with device synchronisation, and the peak memory of one measurement."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 1e9 if self.device.type == "cuda" else None

    def median_seconds(self, fn: Callable[[], Any], warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        times.sort()
        return times[len(times) // 2]


def is_oom(error: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(error, oom_type) or "out of memory" in str(error).lower()


def random_ids(batch: int, length: int, vocab: int, device: torch.device) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), device=device)


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------
def measure_train(model, clock: Clock, context: int, tokens: int, args) -> dict:
    """Tokens/s of forward + backward + AdamW at `context`, halving the batch on out-of-memory."""
    batch = max(1, tokens // context)
    vocab = model.config.vocab_size
    model.train()
    while True:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=clock.device.type == "cuda")
        try:
            clock.reset_peak()
            ids = random_ids(batch, context, vocab, clock.device)

            def step():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            seconds = clock.median_seconds(step, args.warmup, args.train_repeats)
            return dict(value=batch * context / seconds, unit="tokens/s", batch=batch, seconds=seconds,
                        peak_gb=clock.peak_gb())
        except Exception as error:
            if not is_oom(error) or batch == 1:
                raise
            batch //= 2
        finally:
            optimizer.zero_grad(set_to_none=True)
            del optimizer
            model.eval()


@torch.no_grad()
def measure_prefill(model, clock: Clock, length: int, args) -> dict:
    """Seconds for one forward of 1 × `length` tokens that fills the cache."""
    clock.reset_peak()
    ids = random_ids(1, length, model.config.vocab_size, clock.device)
    clock.median_seconds(lambda: model(input_ids=ids[:, :256], use_cache=True, logits_to_keep=1), 1, 1)  # kernels
    seconds = clock.median_seconds(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), args.warmup, args.repeats)
    return dict(value=seconds, unit="s", tokens_per_s=length / seconds, peak_gb=clock.peak_gb())


def _extend_dynamic_cache(cache, context: int) -> None:
    """Grow every attention layer's key/value cache to `context` tokens (zeros); recurrent layers are untouched."""
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.dim() != 4:
            continue
        extra = context - keys.shape[-2]
        layer.keys = torch.cat([keys, keys.new_zeros(*keys.shape[:2], extra, keys.shape[-1])], dim=-2)
        layer.values = torch.cat([layer.values, layer.values.new_zeros(*keys.shape[:2], extra, layer.values.shape[-1])], dim=-2)
    if hasattr(cache, "advance"):
        cache.advance(context - cache.seen_tokens)


@torch.no_grad()
def measure_decode_eager(model, clock: Clock, batch: int, context: int, args) -> dict:
    """Tokens/s of the eager `generate`-style loop (one forward per token on the model's own cache)."""
    clock.reset_peak()
    ids = random_ids(batch, DECODE_PROMPT, model.config.vocab_size, clock.device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    _extend_dynamic_cache(cache, context)
    token = out.logits[:, -1].argmax(-1, keepdim=True)

    def steps(count: int) -> None:
        nonlocal token
        for _ in range(count):
            token = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)

    steps(args.decode_warmup)
    seconds = clock.median_seconds(lambda: steps(args.decode_steps), 0, 1) / args.decode_steps
    return dict(value=batch / seconds, unit="tokens/s", ms_per_token=seconds * 1e3, peak_gb=clock.peak_gb())


@torch.no_grad()
def measure_decode_fast(model, clock: Clock, batch: int, context: int, args) -> dict:
    """Tokens/s of `StaticDecoder` (a CUDA-graph replay per token on CUDA, the eager step elsewhere)."""
    clock.reset_peak()
    total = context + args.decode_warmup + args.decode_steps + 1
    decoder = StaticDecoder(model, batch, total)
    ids = random_ids(batch, DECODE_PROMPT, model.config.vocab_size, clock.device)
    logits = decoder.prefill(ids)
    # pretend that `context` tokens were prefilled: the attention layers now attend over `context` slots
    decoder.slot.fill_(context)
    decoder.positions.fill_(context)
    for layer in decoder.cache.layers:
        if hasattr(layer, "cumulative_length") and isinstance(layer.cumulative_length, torch.Tensor):
            layer.cumulative_length.fill_(context)
    decoder.tokens.copy_(logits.argmax(-1, keepdim=True))

    def steps(count: int) -> None:
        for _ in range(count):
            decoder.tokens.copy_(decoder.step().argmax(-1, keepdim=True))

    steps(args.decode_warmup)
    seconds = clock.median_seconds(lambda: steps(args.decode_steps), 0, 1) / args.decode_steps
    mode = "cuda graph" if decoder.cuda_graph else "eager step"
    return dict(value=batch / seconds, unit="tokens/s", ms_per_token=seconds * 1e3, mode=mode, peak_gb=clock.peak_gb())


# ---------------------------------------------------------------------------------------------------------------
# Plan, run, report
# ---------------------------------------------------------------------------------------------------------------
def plan(args) -> list[tuple[str, str, dict]]:
    """(model, measurement kind, settings) for everything selected, in run order."""
    items = []
    for name in args.models:  # cheapest first, so that a spent time budget cuts training
        if "decode" in args.only:
            for context in args.decode_contexts:
                for batch in args.decode_batches:
                    for path in ("eager", "fast"):
                        items.append((name, f"decode-{path}", dict(context=context, batch=batch)))
        if "prefill" in args.only:
            items += [(name, "prefill", dict(context=c)) for c in args.prefill_lengths]
        if "train" in args.only:
            items += [(name, "train", dict(context=c)) for c in args.train_contexts]
    if args.contexts:
        items = [item for item in items if item[2]["context"] in args.contexts]
    return items


def environment(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
    }
    for package in ("triton", "fla", "causal_conv1d"):
        try:
            info[package] = __import__(package).__version__
        except Exception:
            info[package] = None
    from m2rnn.kernels.gated_delta_rule.op import _fla_backward_works, fla_available
    from m2rnn.kernels.m2rnn.op import _resolve_backend

    refused = "torch (fla's backward refuses this triton on Hopper, fla #640)"
    info["gdn_backend"] = {
        "prefill/decode": "fla" if fla_available(device) else "torch",
        "training": "fla" if fla_available(device) and _fla_backward_works() else refused if fla_available(device) else "torch",
    }

    info["m2rnn_backend"] = _resolve_backend(None, device, "bench")
    return info


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    clock = Clock(device)
    results = dict(environment=environment(device), settings=vars(args).copy(), parameters={}, measurements=[])
    if getattr(args, "fla_unguarded", False):
        results["environment"]["gdn_backend"]["training"] += " (backward guard lifted for timing only, fla #640)"
    results["settings"]["dtype"] = args.dtype
    items = plan(args)
    started = time.perf_counter()
    print(f"{len(items)} measurements on {results['environment']['device']}", flush=True)
    current_name, model = None, None
    for name, kind, settings in items:
        if current_name != name:
            model = None
            clock.reset_peak()
            t0 = time.perf_counter()
            model = build_model(name, args.preset_scale, device, dtype).eval()
            current_name = name
            print(f"  built {name} in {time.perf_counter() - t0:.1f} s", flush=True)
            results["parameters"][name] = sum(p.numel() for p in model.parameters())
        record = dict(model=name, kind=kind, **settings)
        elapsed = time.perf_counter() - started
        if elapsed > args.time_budget:
            record.update(value=None, status="skipped (time budget)")
        else:
            t0 = time.perf_counter()
            try:
                if kind == "train":
                    record.update(measure_train(model, clock, settings["context"], args.train_tokens, args))
                elif kind == "prefill":
                    record.update(measure_prefill(model, clock, settings["context"], args))
                elif kind == "decode-eager":
                    record.update(measure_decode_eager(model, clock, settings["batch"], settings["context"], args))
                else:
                    record.update(measure_decode_fast(model, clock, settings["batch"], settings["context"], args))
                record["status"] = "ok"
            except Exception as error:
                record.update(value=None, status="OOM" if is_oom(error) else f"error: {type(error).__name__}: {str(error)[:200]}")
                if not is_oom(error):
                    traceback.print_exc(limit=4)
            record["wall_s"] = round(time.perf_counter() - t0, 2)
            model.zero_grad(set_to_none=True)
            clock.reset_peak()
        results["measurements"].append(record)
        print(f"  {name:22s} {kind:13s} {settings}  {format_value(record)}  ({record.get('wall_s', 0)} s)", flush=True)
        write_json(results, args.output_dir)
    results["total_s"] = round(time.perf_counter() - started, 1)
    return results


def format_value(record: dict) -> str:
    if record.get("value") is None:
        return record.get("status", "n/a")
    if record["unit"] == "s":
        return f"{record['value'] * 1e3:.1f} ms"
    return f"{record['value']:,.0f} tok/s"


def write_json(results: dict, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "model_results.json").write_text(json.dumps(results, indent=1, default=str))


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        "# Model-level speed: training, prefill, decode",
        "",
        f"Date: {env['date']}. Device: {env['device']}. torch {env['torch']}, transformers {env['transformers']}, "
        f"triton {env['triton']}, fla {env['fla']}, causal-conv1d {env['causal_conv1d']}. dtype "
        f"{results['settings']['dtype']}, sdpa attention. M2RNN backend: {env['m2rnn_backend']}; GDN backend: "
        f"{env['gdn_backend']['prefill/decode']} (prefill/decode), {env['gdn_backend']['training']} (training).",
        f"Command: `{env['command']}`. Total {results.get('total_s', '?')} s.",
        "",
        "| model | parameters |",
        "|---|---|",
    ]
    lines += [f"| {name} | {count / 1e6:.1f} M |" if count >= 1e7 else f"| {name} | {count / 1e6:.3f} M |"
              for name, count in results["parameters"].items()]
    by_kind: dict[str, list[dict]] = {}
    for record in results["measurements"]:
        by_kind.setdefault(record["kind"].split("-")[0], []).append(record)

    def cell(record: dict, key: str = "value") -> str:
        if record.get("value") is None:
            return record.get("status", "n/a")
        if record["unit"] == "s":
            return f"{record['value'] * 1e3:,.1f} ms"
        return f"{record['value']:,.0f}"

    def peak(record: dict) -> str:
        return f"{record['peak_gb']:.1f}" if record.get("peak_gb") is not None else "n/a"

    if "train" in by_kind:
        lines += ["", "## Training (forward + backward + AdamW)", "",
                  "| model | context | batch | tokens/s | peak GB |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['context']} | {r.get('batch', '')} | {cell(r)} | {peak(r)} |" for r in by_kind["train"]]
    if "prefill" in by_kind:
        lines += ["", "## Prefill (batch 1, fills the cache)", "", "| model | tokens | time | tokens/s | peak GB |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['context']} | {cell(r)} | {r.get('tokens_per_s', 0):,.0f} | {peak(r)} |"
                  for r in by_kind["prefill"]]
    if "decode" in by_kind:
        lines += ["", "## Decode (tokens/s summed over the batch; eager loop vs StaticDecoder)", "",
                  "| model | context | batch | eager tok/s | fast tok/s | speed-up | peak GB (eager / fast) |",
                  "|---|---|---|---|---|---|---|"]
        pairs: dict[tuple, dict] = {}
        for r in by_kind["decode"]:
            pairs.setdefault((r["model"], r["context"], r["batch"]), {})[r["kind"]] = r
        for (model, context, batch), pair in pairs.items():
            eager, fast = pair.get("decode-eager", {}), pair.get("decode-fast", {})
            speedup = (f"{fast['value'] / eager['value']:.1f}×" if eager.get("value") and fast.get("value") else "")
            lines.append(f"| {model} | {context} | {batch} | {cell(eager) if eager else ''} | {cell(fast) if fast else ''} | "
                         f"{speedup} | {peak(eager) if eager else ''} / {peak(fast) if fast else ''} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> bool:
    """Bar charts of the three measurements; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kinds = [("train", "training tokens/s"), ("prefill", "prefill ms (batch 1)"), ("decode", "decode tokens/s")]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    models = list(results["parameters"])
    for ax, (kind, title) in zip(axes, kinds):
        records = [r for r in results["measurements"] if r["kind"].startswith(kind)]
        settings = sorted({_setting_label(r) for r in records}, key=_setting_sort_key)
        width = 0.8 / max(len(models), 1)
        for i, model in enumerate(models):
            values = []
            for label in settings:
                match = [r for r in records if r["model"] == model and _setting_label(r) == label]
                value = match[0]["value"] if match and match[0].get("value") is not None else 0.0
                values.append(value * 1e3 if kind == "prefill" else value)
            ax.bar([x + i * width for x in range(len(settings))], values, width, label=model)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(settings))])
        ax.set_xticklabels(settings, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        if kind == "decode":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['environment']['device']}, {results['settings']['dtype']} (0 = OOM / skipped)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _setting_label(record: dict) -> str:
    if record["kind"].startswith("decode"):
        return f"{record['kind'].split('-')[1]} B{record['batch']} ctx {record['context']}"
    return f"ctx {record['context']}"


def _setting_sort_key(label: str) -> tuple:
    """ctx first, then batch: "fast B32 ctx 1024" -> ("fast", 1024, 32)."""
    words = label.split()
    batch = int(words[1][1:]) if words[1].startswith("B") else 0
    return (words[0], int(words[-1]), batch)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    names = lambda text: [x for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--device", default="cuda",
                        help="default: %(default)s; --device cpu --preset-scale tiny is the CPU smoke run")
    parser.add_argument("--preset-scale", choices=sorted(DEFAULTS), default="400m",
                        help="400m: the paper's presets; tiny: 4-layer versions for a CPU smoke run")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default bf16 (fp32 on CPU)")
    parser.add_argument("--models", type=names, default=list(MODELS), help=f"comma list of {list(MODELS)}")
    parser.add_argument("--only", type=names, default=list(MEASUREMENTS), help=f"comma list of {list(MEASUREMENTS)}")
    parser.add_argument("--quick", action="store_true", help="4K training, 4K prefill, decode after 1K tokens")
    parser.add_argument("--contexts", type=ints, default=None,
                        help="keep only measurements at these context lengths (e.g. 4096,32768)")
    parser.add_argument("--train-contexts", type=ints, default=None)
    parser.add_argument("--prefill-lengths", type=ints, default=None)
    parser.add_argument("--decode-contexts", type=ints, default=None)
    parser.add_argument("--decode-batches", type=ints, default=None)
    parser.add_argument("--train-tokens", type=int, default=None, help="tokens per training step (batch = this / context)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing training and prefill")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefill calls (the median is reported)")
    parser.add_argument("--train-repeats", type=int, default=2, help="timed training steps (the median is reported)")
    parser.add_argument("--decode-warmup", type=int, default=4)
    parser.add_argument("--decode-steps", type=int, default=32, help="timed decode tokens")
    parser.add_argument("--time-budget", type=float, default=330.0, help="seconds; later measurements are skipped")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--fla-unguarded", action="store_true",
                        help="timing only: lift fla's Hopper/Triton<3.7.1 backward guard (its gradients are wrong there)")
    args = parser.parse_args(argv)

    for key, allowed in (("models", MODELS), ("only", MEASUREMENTS)):
        unknown = [x for x in getattr(args, key) if x not in allowed]
        if unknown:
            parser.error(f"--{key}: unknown {unknown}; choose from {list(allowed)}")
    defaults = dict(DEFAULTS[args.preset_scale])
    if args.quick and args.preset_scale == "400m":
        defaults.update(QUICK)
    if args.quick:
        args.repeats, args.train_repeats = min(args.repeats, 2), min(args.train_repeats, 2)
        args.decode_steps = min(args.decode_steps, 16)
    args.train_contexts = args.train_contexts or defaults["train"]
    args.prefill_lengths = args.prefill_lengths or defaults["prefill"]
    args.decode_contexts = args.decode_contexts or defaults["decode"]
    args.decode_batches = args.decode_batches or defaults["batches"]
    args.train_tokens = args.train_tokens or defaults["tokens"]
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_model.py: --device cuda: no CUDA device here (a GPU benchmark); "
                 "--device cpu --preset-scale tiny is the CPU smoke run")
    return args


def lift_fla_backward_guard() -> str:
    """Let fla's gated GDN backward run on Hopper with Triton < 3.7.1 (fla #640), for timing only."""
    import fla.ops.common.chunk_o as chunk_o
    import fla.utils

    from m2rnn.kernels.gated_delta_rule import op

    chunk_o.TRITON_ABOVE_3_7_1 = fla.utils.TRITON_ABOVE_3_7_1 = True
    op._fla_backward_works.cache_clear()
    return "fla backward guard lifted for timing (fla #640: its GDN gradients are wrong on this Triton/Hopper)"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.fla_unguarded:
        print(lift_fla_backward_guard(), flush=True)
    results = run(args)
    text = markdown(results)
    (args.output_dir / "model_results.md").write_text(text)
    write_json(results, args.output_dir)
    plotted = plot(results, args.output_dir / "model_results.png")
    print("\n" + text)
    print(f"wrote {args.output_dir / 'model_results.md'}, .json{', .png' if plotted else ''} in {results['total_s']} s")
    return results


if __name__ == "__main__":
    main()
