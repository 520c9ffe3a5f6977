"""Two-GPU training checks and figures (benchmarks/RESULTS.md §4): `examples/finetune.py` under `accelerate launch`.

    python benchmarks/bench_distributed.py --output-dir OUT              # on a 2-GPU machine, ~8 minutes
    python benchmarks/bench_distributed.py --output-dir OUT --smoke      # the same phases, tiny model, CPU (gloo)

Every phase is one command line (printed, and stored in OUT/results.json beside its report) bounded by a timeout,
so a slow phase cannot eat the others; results.json is rewritten after each phase. Phases:

- single: one GPU, the global batch (4 documents of 2K-4K random tokens, packed), 20 steps: the reference losses,
  tokens/s and peak memory; at the same time on the second GPU, `memory`: peak memory of one training step at
  batch 8 x 4K with the plain and the fused (liger) cross-entropy, and the largest batch that fits with each;
- ddp, fsdp2, fsdp2_ac: two GPUs, 2 documents per GPU (the same global batch, the same documents per step), 20 steps;
  fsdp2 saves sharded checkpoints at steps 10 and 20; fsdp2_resume continues from step 10;
- consolidate: the sharded step-20 checkpoint to a Hub folder, loaded with and without the package;
- fsdp2_padded: the fsdp2 run with padded rows instead of packed ones (the same documents);
- moe_ddp, moe_ddp_gc: a 2-layer cut of the 7B MoE preset under plain DDP, without and with gradient checkpointing.

bf16 mixed precision (fp32 master weights), Triton M2RNN kernels, sdpa attention; GDN layers train on the
project's torch chunked path (fla 0.6 refuses its gated backward on Hopper with Triton < 3.7.1, fla #640) unless
`--fla-unguarded` adds the one-GPU and DDP timings again with fla's kernels (timing only: its gradients are wrong
there), the worker being this file's `--worker` mode: finetune.py with the guard lifted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "examples" / "finetune.py"
DDP_YAML = ROOT / "examples" / "accelerate" / "ddp.yaml"
FSDP2_YAML = ROOT / "examples" / "accelerate" / "fsdp2.yaml"
PRESET, MOE_PRESET = "hybrid-gdn-m2rnn-1l-400m", "hybrid-gdn-m2rnn-1l-7b"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny preset on CPU: checks the plumbing only")
    parser.add_argument("--phases", help="comma-separated subset of the phases (default: all)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=4096, help="documents of max/2 to max random tokens")
    parser.add_argument("--docs-per-gpu", type=int, default=2, help="documents per GPU and step (the one-GPU run "
                        "takes twice as many: the same global batch)")
    parser.add_argument("--budget", type=float, default=540, help="seconds for all phases: a phase that would "
                        "start later is skipped, and each phase's timeout is cut to what is left")
    parser.add_argument("--fla-unguarded", action="store_true", help="add single_fla and ddp_fla: the one-GPU and "
                        "DDP timings again with fla's GDN backward guard lifted (timing only: its gradients are wrong)")
    return parser.parse_args(argv)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, args.output_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {"environment": environment(), "phases": {}}
        self.lock = threading.Lock()
        self.deadline = time.monotonic() + args.budget

    def finetune(self, name: str, launcher: list[str], options: list[str], timeout: float, gpus: str | None = None,
                 model: list[str] | None = None, fla_unguarded: bool = False):
        """One `finetune.py` run; its report (losses, tokens/s, peak memory) goes into results[name]."""
        report = self.out / f"{name}.json"
        model = model or (["--preset", "tiny"] if self.args.smoke else ["--preset", PRESET])
        script = [str(FINETUNE)]
        if fla_unguarded:
            script = [str(Path(__file__).resolve()), "--worker"]
        command = launcher + script + model + [
            "--random-tokens", "400", "--max-length", "64" if self.args.smoke else str(self.args.max_length), "--lr", "3e-4",
            "--max-steps", str(self.args.steps), "--report", str(report),
        ] + options
        self.run(name, command, timeout, gpus)
        if report.is_file():
            with self.lock:
                self.results["phases"][name].update(json.loads(report.read_text()))
        self.save()

    def run(self, name: str, command: list[str], timeout: float, gpus: str | None = None) -> int:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        line = " ".join(shlex.quote(part) for part in command)
        timeout = min(timeout, self.deadline - time.monotonic())
        if timeout < 20:
            print(f"\n=== {name}: skipped (time budget spent): {line}", flush=True)
            with self.lock:
                self.results["phases"][name] = {"command": line, "exit": "skipped"}
            return -1
        print(f"\n=== {name}: {line}", flush=True)
        started = time.perf_counter()
        try:
            completed = subprocess.run(command, env=env, cwd=ROOT, timeout=timeout, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
            code, output = completed.returncode, completed.stdout
        except subprocess.TimeoutExpired as error:
            code, output = "timeout", (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        lines = [x for x in output.splitlines() if "Warning" not in x and "warn(" not in x]
        print("\n".join(lines[-25:]), flush=True)
        with self.lock:
            self.results["phases"][name] = {"command": line, "exit": code, "seconds": round(time.perf_counter() - started, 1)}
        self.save()
        return code

    def save(self) -> None:
        with self.lock:
            (self.out / "results.json").write_text(json.dumps(self.results, indent=1))


def environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__}
    for name in ("triton", "transformers", "accelerate", "liger_kernel", "fla"):
        try:
            info[name] = __import__(name).__version__
        except Exception as error:  # not installed, or no version
            info[name] = f"missing ({type(error).__name__})"
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def memory_probe(smoke: bool, output: Path) -> None:
    """Peak GPU memory of one bf16-autocast training step (fp32 weights, AdamW) at 4K context, plain and fused CE,
    and the largest batch (from a ladder) that fits; run in its own process on one GPU."""
    import torch

    from m2rnn import M2RNNConfig, M2RNNForCausalLM
    from m2rnn.losses import apply_liger_kernel_to_m2rnn

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = M2RNNConfig.from_preset("tiny" if smoke else PRESET)
    model = M2RNNForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    length = 64 if smoke else 4096
    results: dict[str, Any] = {"context": length, "runs": []}

    def step(batch: int, fused: bool) -> float | None:
        apply_liger_kernel_to_m2rnn(model, fused_linear_cross_entropy=fused)
        input_ids = torch.randint(4, config.vocab_size, (batch, length), device=device)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            return None
        return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0

    step(1, False)  # optimizer states exist from here on, as in training
    for fused in (False, True) if device == "cuda" else (False,):
        fits = None
        for batch in (2, 4, 6, 8, 12, 16, 24, 32):
            peak = step(batch, fused)
            results["runs"].append({"fused_ce": fused, "batch": batch, "peak_gib": peak})
            print(f"memory: fused_ce={fused} batch={batch} x {length}: "
                  f"{'OOM' if peak is None else f'{peak:.1f} GiB'}", flush=True)
            output.write_text(json.dumps(results, indent=1))
            if peak is None:
                break
            fits = batch
        results[f"largest_batch_{'fused' if fused else 'plain'}"] = fits
    output.write_text(json.dumps(results, indent=1))


def check_consolidated(consolidated: Path, full: Path, output: Path) -> None:
    """The consolidated sharded checkpoint equals the gathered final save, and loads with and without the package."""
    import torch
    from transformers import AutoModelForCausalLM

    import m2rnn  # noqa: F401  (registers the model type)
    from m2rnn.apps.hub import load_without_package

    ours = AutoModelForCausalLM.from_pretrained(consolidated).eval()
    reference = AutoModelForCausalLM.from_pretrained(full).eval()
    same = all(torch.equal(value, reference.state_dict()[name]) for name, value in ours.state_dict().items())
    input_ids = [[5, 17, 300 % ours.config.vocab_size, 42]]
    with torch.no_grad():
        logits = ours(torch.tensor(input_ids)).logits
    isolated = load_without_package(consolidated, input_ids)
    result = {"weights_equal_final_save": same, "no_package_max_abs_diff": (isolated - logits).abs().max().item()}
    print(f"consolidate: {result}", flush=True)
    output.write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not args.smoke:
        import torch

        if torch.cuda.device_count() < 2:
            raise SystemExit(f"bench_distributed.py: error: needs two CUDA GPUs, found {torch.cuda.device_count()}; "
                             "--smoke runs the same phases with the tiny model on CPU")
    bench = Bench(args)
    out, smoke, steps = args.output_dir, args.smoke, args.steps
    phases = set(args.phases.split(",")) if args.phases else None
    wanted = lambda name: phases is None or name in phases  # noqa: E731
    py = [sys.executable]
    two = py + ["-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file"]
    bf16 = [] if smoke else ["--bf16"]
    big = 600 if not smoke else 300
    docs = str(args.docs_per_gpu)

    if wanted("single"):
        threads = []
        if wanted("memory"):
            memory = threading.Thread(target=bench.run, args=(
                "memory", py + [__file__, "--output-dir", str(out), "--memory-probe"] + (["--smoke"] if smoke else []),
                big, "1"))
            memory.start()
            threads.append(memory)
        bench.finetune("single", py, ["--batch-size", str(2 * args.docs_per_gpu), "--no-save"] + bf16, big, gpus="0")
        for thread in threads:
            thread.join()
        if (out / "memory.json").is_file():
            bench.results["phases"]["memory"].update(json.loads((out / "memory.json").read_text()))
            bench.save()
    if wanted("ddp"):
        bench.finetune("ddp", two + [str(DDP_YAML)], ["--batch-size", docs, "--no-save", "--check-replicas"] + bf16, big)
    moe = ["--preset", "tiny"] if smoke else ["--preset", MOE_PRESET, "--layers", "2"]
    for name, extra in (("moe_ddp", []), ("moe_ddp_gc", ["--gradient-checkpointing"])):
        if wanted(name):
            bench.finetune(name, two + [str(DDP_YAML)], ["--batch-size", "1", "--no-save", "--check-replicas",
                                                         "--max-steps", "3"] + extra + bf16, big, model=moe)
    checkpoints, final = out / "fsdp2-checkpoints", out / "fsdp2-final"
    if wanted("fsdp2"):
        bench.finetune("fsdp2", two + [str(FSDP2_YAML)], [
            "--batch-size", docs, "--save-every", str(steps // 2), "--checkpoint-dir", str(checkpoints),
            "--output-dir", str(final), "--overwrite"] + bf16, big)
    if wanted("fsdp2_resume"):
        bench.finetune("fsdp2_resume", two + [str(FSDP2_YAML)], [
            "--batch-size", docs, "--resume-from", str(checkpoints / f"step-{steps // 2}"), "--no-save"] + bf16, big)
    if wanted("consolidate"):
        consolidated = out / "fsdp2-consolidated"
        code = bench.run("consolidate", py + [str(FINETUNE), "--consolidate", str(checkpoints / f"step-{steps}"),
                                              "--output-dir", str(consolidated), "--overwrite"], big)
        if code == 0:
            bench.run("consolidate_check", py + [__file__, "--output-dir", str(out), "--check-consolidated",
                                                 str(consolidated), str(final)], big)
            if (out / "consolidate.json").is_file():
                bench.results["phases"]["consolidate_check"].update(json.loads((out / "consolidate.json").read_text()))
                bench.save()
    if wanted("fsdp2_ac"):
        bench.finetune("fsdp2_ac", two + [str(FSDP2_YAML), "--fsdp_activation_checkpointing", "true"],
                       ["--batch-size", docs, "--no-save"] + bf16, big)
    if wanted("fsdp2_padded"):
        bench.finetune("fsdp2_padded", two + [str(FSDP2_YAML)], ["--batch-size", docs, "--no-save", "--no-packing"] + bf16, big)
    if args.fla_unguarded:
        fla_steps = ["--max-steps", "8"]
        bench.finetune("single_fla", py, ["--batch-size", str(2 * args.docs_per_gpu), "--no-save"] + fla_steps + bf16, big, gpus="0",
                       fla_unguarded=True)
        bench.finetune("ddp_fla", two + [str(DDP_YAML)], ["--batch-size", docs, "--no-save"] + fla_steps + bf16, big,
                       fla_unguarded=True)
    summarise(bench.results)
    bench.save()
    print(json.dumps(bench.results["summary"], indent=1), flush=True)
    return bench.results


def summarise(results: dict[str, Any]) -> None:
    """Loss differences against the one-GPU run, resume continuity, scaling."""
    phases = results["phases"]
    summary: dict[str, Any] = {}
    reference = phases.get("single", {}).get("losses")
    for name in ("ddp", "fsdp2", "fsdp2_ac", "fsdp2_padded"):
        losses = phases.get(name, {}).get("losses")
        if reference and losses:
            diffs = [abs(a - b) for a, b in zip(losses, reference)]
            summary[f"{name}_vs_single"] = {"max_abs": max(diffs), "first": diffs[0], "steps": len(diffs)}
    resumed, full = phases.get("fsdp2_resume", {}), phases.get("fsdp2", {}).get("losses")
    if resumed.get("losses") and full:
        tail = full[resumed["first_step"]:]
        summary["resume_vs_uninterrupted_max_abs"] = max(abs(a - b) for a, b in zip(resumed["losses"], tail))
    single = phases.get("single", {}).get("tokens_per_second")
    for name in ("ddp", "fsdp2", "fsdp2_ac"):
        rate = phases.get(name, {}).get("tokens_per_second")
        if single and rate:
            summary[f"{name}_scaling"] = rate / single
    single_fla, ddp_fla = (phases.get(name, {}).get("tokens_per_second") for name in ("single_fla", "ddp_fla"))
    if single_fla and ddp_fla:
        summary["ddp_fla_scaling"] = ddp_fla / single_fla
    results["summary"] = summary


if __name__ == "__main__":
    if "--worker" in sys.argv:  # finetune.py with fla's GDN backward guard lifted (timing only)
        sys.argv.remove("--worker")
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_model import lift_fla_backward_guard

        print(lift_fla_backward_guard(), flush=True)
        sys.argv[0] = str(FINETUNE)
        import runpy

        runpy.run_path(str(FINETUNE), run_name="__main__")
    elif "--memory-probe" in sys.argv:
        out = Path(sys.argv[sys.argv.index("--output-dir") + 1])
        memory_probe("--smoke" in sys.argv, out / "memory.json")
    elif "--check-consolidated" in sys.argv:
        i = sys.argv.index("--check-consolidated")
        out = Path(sys.argv[sys.argv.index("--output-dir") + 1])
        check_consolidated(Path(sys.argv[i + 1]), Path(sys.argv[i + 2]), out / "consolidate.json")
    else:
        main()
