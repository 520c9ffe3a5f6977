"""Where one training step of `examples/finetune.py` spends its time: torch.profiler over a few steps.

    python benchmarks/profile_train_step.py --output-dir OUT                        # 400M, packed 1K docs, GPU
    python benchmarks/profile_train_step.py --output-dir OUT --pad-to-multiple-of 1 # exact row lengths
    python benchmarks/profile_train_step.py --output-dir OUT --no-packing          # the same documents, padded rows
    python benchmarks/profile_train_step.py --output-dir OUT --fla-unguarded       # fla's GDN kernels (timing only)
    python benchmarks/profile_train_step.py --output-dir OUT --smoke               # tiny preset on CPU: plumbing

The step is finetune.py's (fp32 master weights, bf16 autocast, AdamW, the same random documents and collators),
run in one process without accelerate so the profile holds nothing else. Rows are rounded up to a multiple of
`--pad-to-multiple-of` tokens as in finetune.py, and the warm-up steps see the same row lengths as the profiled ones
(the steady state of a long run, where every rounded length has been seen); `1` profiles exact lengths, each
step a new shape. Reported per step: wall time, GPU busy
time (the sum of kernel durations), kernel launches, and the operators with the most self device / host time.
A step whose GPU busy time is a small share of its wall time is bound by the host (launches, syncs), not the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DataCollatorWithFlattening

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from finetune import pad_documents, random_documents  # noqa: E402

from m2rnn import M2RNNConfig, M2RNNForCausalLM  # noqa: E402
from m2rnn.training import PACKED_ROW_MULTIPLE, pad_packed_row  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--preset", default="hybrid-gdn-m2rnn-1l-400m")
    parser.add_argument("--max-length", type=int, default=1024, help="documents of max/2 to max random tokens")
    parser.add_argument("--docs", type=int, default=2, help="documents per step")
    parser.add_argument("--no-packing", action="store_true", help="padded rows instead of one packed row")
    parser.add_argument("--fla-unguarded", action="store_true", help="lift fla's Hopper backward guard (timing only)")
    parser.add_argument("--pad-to-multiple-of", type=int, default=PACKED_ROW_MULTIPLE, metavar="N",
                        help="round row lengths up to a multiple of N (1: exact lengths)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, 64-token documents, CPU")
    return parser.parse_args(argv)


def profile_steps(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then profile `args.steps` training steps; returns the per-step summary."""
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    preset, length = ("tiny", 64) if args.smoke else (args.preset, args.max_length)
    torch.manual_seed(0)
    model = M2RNNForCausalLM(M2RNNConfig.from_preset(preset)).to(device).train()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    documents = random_documents(args.docs * args.steps, length, model.config.vocab_size, 0)
    multiple, pad_id = args.pad_to_multiple_of, model.config.pad_token_id or 0
    if args.no_packing:
        collate = pad_documents(pad_id, multiple)
    else:
        flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=True)
        collate = lambda docs: pad_packed_row(flatten(docs), multiple, pad_id)  # noqa: E731
    profiled = [collate(documents[i : i + args.docs]) for i in range(0, len(documents), args.docs)]
    if multiple == 1:  # exact lengths: the warm-up rows are other lengths, as in a run where every step is new
        warm = random_documents(args.docs * args.warmup, length, model.config.vocab_size, 1)
        warmup = [collate(warm[i : i + args.docs]) for i in range(0, len(warm), args.docs)]
    else:  # rounded lengths: the profiled shapes have been seen, as after the first steps of a long run
        warmup = [profiled[i % len(profiled)] for i in range(max(args.warmup, len(profiled)))]

    def step(batch: dict[str, torch.Tensor]) -> None:
        batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for batch in warmup:
        step(batch)
    synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for batch in profiled:
            step(batch)
        synchronize()
    wall = (time.perf_counter() - started) / args.steps
    events = prof.key_averages()
    device_time = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total for e in kernels) / 1e6
    tokens = sum(len(document["input_ids"]) for document in documents) / args.steps  # padding left out

    def top(key: str, count: int = 12) -> list[dict[str, Any]]:
        ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:count]
        return [{"op": e.key, "calls_per_step": e.count / args.steps, "ms_per_step": getattr(e, key) / 1e3 / args.steps}
                for e in ranked]

    gdn_backend = "fla (guard lifted)" if args.fla_unguarded else "fla" if device == "cuda" and _fla_trains() else "torch"
    return {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "preset": preset, "max_length": length,
        "docs_per_step": args.docs, "packed": not args.no_packing, "row_multiple": multiple, "gdn_backend": gdn_backend,
        "tokens_per_step": tokens, "wall_ms_per_step": wall * 1e3, "tokens_per_second": tokens / wall,
        "gpu_busy_ms_per_step": busy / args.steps * 1e3 if device == "cuda" else None,
        "kernel_launches_per_step": len(kernels) / args.steps,
        "top_device_ops": top(device_time) if device == "cuda" else [],
        "top_host_ops": top("self_cpu_time_total"),
    }


def _fla_trains() -> bool:
    from m2rnn.kernels.gated_delta_rule.op import _fla_backward_works, _fla_importable

    return _fla_importable() and _fla_backward_works()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.fla_unguarded:
        from bench_model import lift_fla_backward_guard

        print(lift_fla_backward_guard(), flush=True)
    result = profile_steps(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    name = (f"profile_{'padded' if args.no_packing else 'packed'}_{result['max_length']}_r{result['row_multiple']}"
            f"{'_fla' if args.fla_unguarded else ''}.json")
    (args.output_dir / name).write_text(json.dumps(result, indent=1))
    busy = result["gpu_busy_ms_per_step"]
    print(f"{result['preset']}, {result['docs_per_step']} docs of <= {result['max_length']} tokens, "
          f"{'packed' if result['packed'] else 'padded'}, rows rounded to {result['row_multiple']}, GDN {result['gdn_backend']}: "
          f"{result['wall_ms_per_step']:.1f} ms per step ({result['tokens_per_second']:,.0f} tok/s), "
          f"GPU busy {'n/a' if busy is None else f'{busy:.1f} ms'}, {result['kernel_launches_per_step']:.0f} kernels")
    for title, rows in (("device", result["top_device_ops"]), ("host", result["top_host_ops"])):
        print(f"top self {title} time per step:")
        for row in rows:
            print(f"  {row['ms_per_step']:9.2f} ms  {row['calls_per_step']:7.0f} calls  {row['op'][:90]}")
    return result


if __name__ == "__main__":
    main()
