"""Two-GPU checks and figures (benchmarks/RESULTS.md §4): `examples/finetune.py`, lm-eval and `m2rnn eval` under
`accelerate launch`, each against one GPU.

    python benchmarks/bench_distributed.py --output-dir OUT              # on a 2-GPU machine, ~8 minutes a call
    python benchmarks/bench_distributed.py --output-dir OUT --smoke      # the same phases, tiny model, CPU (gloo)
    python benchmarks/bench_distributed.py --output-dir OUT --phases single_fla,ddp_fla,lm_eval_dp,eval_dp

Every phase is one or more command lines (printed, and stored in OUT/results.json beside their reports; their output
in OUT/NAME.log), each bounded by a timeout (a finetune run also by EXIT_GRACE seconds after it wrote its report), so
a slow or hung phase cannot eat the others; results.json is rewritten after each command. `--phases` runs the
phases in the order given. Phases (default order):

- single: one GPU, the global batch (4 documents of 2K-4K random tokens, packed), 20 steps: the reference losses,
  tokens/s and peak memory; at the same time on the second GPU, `memory`: peak memory of one training step at
  batch 8 x 4K with the plain and the fused (liger) cross-entropy, and the largest batch that fits with each;
- ddp, fsdp2, fsdp2_ac: two GPUs, 2 documents per GPU (the same global batch, the same documents per step), 20 steps;
  `--accumulation N` gives every run N micro-batches per GPU and step, and `--single-accumulates` makes the one-GPU
  runs accumulate 2N micro-batches of the per-GPU width instead of N twice as wide (the scaling then compares equal
  micro-batches: the host's per-micro-batch cost is paid by both sides alike);
  fsdp2 saves sharded checkpoints at steps 10 and 20 and the gathered final model; fsdp2_resume continues from step 10;
- moe_ddp, moe_ddp_gc: a 2-layer cut of the 7B MoE preset under plain DDP, without and with gradient checkpointing;
- consolidate: the sharded step-20 checkpoint to a Hub folder; consolidate_check (consolidating first when
  consolidate has not run): that folder loaded on the GPU equals fsdp2's gathered final save, and loads without the
  package;
- fsdp2_padded: the fsdp2 run with padded rows instead of packed ones (the same documents); fsdp2_ac and
  fsdp2_padded are compared with fsdp2 as well as with single;
- single_fla, ddp_fla (default only with `--fla-unguarded`): single and ddp again, 8 steps, with fla's GDN kernels
  (timing only: the worker is this file's `--worker` mode, finetune.py with fla's backward guard lifted, fla #640)
  and the fused cross-entropy in both, so that the one-GPU global batch fits 80 GB at 4K;
- lm_eval_dp: `python -m lm_eval --model hf --model_args pretrained=FOLDER,trust_remote_code=True,dtype=float32 ...`
  on one GPU, then under `accelerate launch --config_file examples/accelerate/ddp.yaml -m lm_eval` on two; then the
  same with `m2rnn eval lm-eval`; local tasks written into OUT/lm-eval-tasks (200 multiple-choice documents, 16
  generations); per-document log-likelihoods (matched by doc id), generations and metrics compared;
- eval_dp: `m2rnn eval niah FOLDER --tasks single_1 --lengths 512 --limit 8` in one process and under the same launch
  on two; the results files compared field by field.
The evaluation phases load the consolidated folder when it exists, else a fresh --preset model (seed 0) saved into
OUT/eval-model, with the byte-level tokenizer added where there is none.

bf16 mixed precision (fp32 master weights), Triton M2RNN kernels, sdpa attention; GDN layers train on the
project's torch chunked path (fla 0.6 refuses its gated backward on Hopper with Triton < 3.7.1, fla #640) except in
the fla phases. On CPU (--smoke) lm-eval does not split the data (it does only with two or more GPUs), so the smoke
run of lm_eval_dp checks the plumbing and the comparison, not the split.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import signal
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_distributed_eval import (  # noqa: E402
    compare_lm_eval, compare_results_files, loglikelihood_requests, prepare_model, read_lm_eval_cli, read_m2rnn_lm_eval,
    write_tasks,
)


PHASES = ("single", "memory", "ddp", "moe_ddp", "moe_ddp_gc", "fsdp2", "fsdp2_resume", "consolidate",
          "consolidate_check", "fsdp2_ac", "fsdp2_padded", "single_fla", "ddp_fla", "lm_eval_dp", "eval_dp")
FLA_PHASES = ("single_fla", "ddp_fla")
EXIT_GRACE = 60  # seconds a finetune run may take to exit after writing its report
RUN_MARKER = "BENCH_DISTRIBUTED_RUN"  # in the environment of every process a phase's command starts
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # local tasks and folders only: no Hub try to time out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny preset on CPU: checks the plumbing only")
    parser.add_argument("--preset", help=f"the model trained and evaluated (default: {PRESET}, tiny with --smoke); "
                        f"the MoE phases take the 2-layer cut of {MOE_PRESET}, or tiny (4 experts) with tiny")
    parser.add_argument("--phases", help="comma-separated phases, run in the order given (default: all but "
                        f"{' and '.join(FLA_PHASES)}, in this order: {','.join(PHASES)}); memory runs beside single")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=4096, help="documents of max/2 to max random tokens")
    parser.add_argument("--docs-per-gpu", type=int, default=2, help="documents per GPU and micro-batch (the one-GPU "
                        "run takes twice as many per micro-batch, or twice the micro-batches with --single-accumulates: "
                        "the same global batch)")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per GPU and optimizer step")
    parser.add_argument("--single-accumulates", action="store_true", help="the one-GPU runs (single, single_fla) "
                        "reach the global batch by accumulating twice as many micro-batches of DOCS_PER_GPU, instead "
                        "of micro-batches twice as wide: each micro-batch is then the same rows as one GPU's of the "
                        "two-GPU runs, so the scaling compares equal work per micro-batch")
    parser.add_argument("--fla-steps", type=int, default=8, help="steps of single_fla and ddp_fla")
    parser.add_argument("--pad-to-multiple-of", type=int, metavar="N", help="finetune.py's option of the same name "
                        "(packed rows rounded up to N tokens; default: finetune.py's)")
    parser.add_argument("--budget", type=float, default=540, help="seconds for all phases: a phase that would "
                        "start later is skipped, and each phase's timeout is cut to what is left")
    parser.add_argument("--fla-unguarded", action="store_true", help="add single_fla and ddp_fla to the default "
                        "phases: the one-GPU and DDP timings again with fla's GDN backward guard lifted (timing only: "
                        "its gradients are wrong)")
    args = parser.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.smoke else PRESET)
    from m2rnn import M2RNNConfig

    if args.preset not in M2RNNConfig.preset_names():
        parser.error(f"--preset: unknown preset {args.preset!r}; presets: {', '.join(M2RNNConfig.preset_names())}")
    for option in ("steps", "max_length", "docs_per_gpu", "accumulation", "fla_steps", "pad_to_multiple_of"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    if args.phases is None:
        args.phases = [name for name in PHASES if args.fla_unguarded or name not in FLA_PHASES]
    else:
        args.phases = [name.strip() for name in args.phases.split(",") if name.strip()]
        unknown = [name for name in args.phases if name not in PHASES]
        if unknown or not args.phases:
            parser.error(f"--phases: unknown phase(s) {', '.join(unknown) or '(none given)'}; "
                         f"phases: {', '.join(PHASES)}")
        if len(set(args.phases)) < len(args.phases):
            parser.error(f"--phases: a phase is named twice in {','.join(args.phases)}")
    return args


class Bench:
    """The phases (one method each, named as in PHASES) and the bookkeeping they share."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.out, self.smoke = args, args.output_dir, args.smoke
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {"environment": environment(), "phases": {}}
        self.lock = threading.Lock()
        self.deadline = time.monotonic() + args.budget
        self.py = [sys.executable]
        # --smoke: float32 everywhere (the launch configs ask for bf16, which the one-process runs would not get)
        precision = ["--mixed_precision", "no"] if self.smoke else []
        self.two = self.py + ["-m", "accelerate.commands.launch", "--num_processes", "2", *precision, "--config_file"]
        self.bf16 = [] if self.smoke else ["--bf16"]
        self.timeout = 300 if self.smoke else 600
        self.docs = str(args.docs_per_gpu)
        # options of a two-GPU run's micro-batches, and of the one-GPU run that sees the same global batch
        self.per_gpu = ["--batch-size", self.docs, "--accumulation", str(args.accumulation)]
        self.one_gpu = (["--batch-size", self.docs, "--accumulation", str(2 * args.accumulation)]
                        if args.single_accumulates else
                        ["--batch-size", str(2 * args.docs_per_gpu), "--accumulation", str(args.accumulation)])
        self.checkpoints, self.final = self.out / "fsdp2-checkpoints", self.out / "fsdp2-final"
        self.consolidated = self.out / "fsdp2-consolidated"
        self._eval_model: Path | None = None
        self._eval_model_prepared = False

    # ------------------------------------------------------------------------------------------------ training

    def single(self) -> None:
        """One GPU, the global batch; `memory` beside it on the second GPU when that phase is wanted."""
        memory = None
        if "memory" in self.args.phases:
            memory = threading.Thread(target=self.run, args=(
                "memory", self.py + [__file__, "--output-dir", str(self.out), "--memory-probe"] + self._smoke_flag(),
                self.timeout, "1"))
            memory.start()
        self.finetune("single", self.py, self.one_gpu + ["--no-save"] + self.bf16, gpus="0")
        if memory is not None:
            memory.join()
            if (self.out / "memory.json").is_file():
                self.results["phases"]["memory"].update(json.loads((self.out / "memory.json").read_text()))
                self.save()

    def ddp(self) -> None:
        self.finetune("ddp", self.two + [str(DDP_YAML)], self.per_gpu + ["--no-save", "--check-replicas"] + self.bf16)

    def moe_ddp(self, name: str = "moe_ddp", extra: tuple[str, ...] = ()) -> None:
        moe = ["--preset", "tiny"] if self.args.preset == "tiny" else ["--preset", MOE_PRESET, "--layers", "2"]
        self.finetune(name, self.two + [str(DDP_YAML)], ["--batch-size", "1", "--no-save", "--check-replicas",
                                                         "--max-steps", "3", *extra] + self.bf16, model=moe)

    def moe_ddp_gc(self) -> None:
        self.moe_ddp("moe_ddp_gc", ("--gradient-checkpointing",))

    def fsdp2(self) -> None:
        self.finetune("fsdp2", self.two + [str(FSDP2_YAML)], self.per_gpu + [
            "--save-every", str(self.args.steps // 2), "--checkpoint-dir",
            str(self.checkpoints), "--output-dir", str(self.final), "--overwrite"] + self.bf16)

    def fsdp2_resume(self) -> None:
        self.finetune("fsdp2_resume", self.two + [str(FSDP2_YAML)], self.per_gpu + [
            "--resume-from", str(self.checkpoints / f"step-{self.args.steps // 2}"),
            "--no-save"] + self.bf16)

    def consolidate(self) -> int:
        """The sharded final checkpoint of `fsdp2` to a Hub folder."""
        return self.run("consolidate", self.py + [
            str(FINETUNE), "--consolidate", str(self.checkpoints / f"step-{self.args.steps}"),
            "--output-dir", str(self.consolidated), "--overwrite"], self.timeout)

    def consolidate_check(self) -> None:
        """The consolidated folder (written first when `consolidate` has not run) loaded on the GPU: weights equal to
        `fsdp2`'s gathered final save; and loaded without the package."""
        if not (self.consolidated / "config.json").is_file():
            if not (self.checkpoints / f"step-{self.args.steps}").is_dir():
                self.note("consolidate_check", f"skipped: no {self.consolidated.name} and no sharded checkpoint "
                          "(run fsdp2 first)")
                return
            if self.consolidate() != 0:
                return
        self.run("consolidate_check", self.py + [__file__, "--output-dir", str(self.out), "--check-consolidated",
                                                 str(self.consolidated), str(self.final)], self.timeout, gpus="0")
        self.merge_report("consolidate_check", self.out / "consolidate.json")

    def fsdp2_ac(self) -> None:
        self.finetune("fsdp2_ac", self.two + [str(FSDP2_YAML), "--fsdp_activation_checkpointing", "true"],
                      self.per_gpu + ["--no-save"] + self.bf16)

    def fsdp2_padded(self) -> None:
        self.finetune("fsdp2_padded", self.two + [str(FSDP2_YAML)],
                      self.per_gpu + ["--no-save", "--no-packing"] + self.bf16)

    def single_fla(self) -> None:
        """`single` with fla's GDN kernels (guard lifted, timing only) and the fused loss, so that the global batch
        fits one GPU at 4K; FLA_STEPS steps."""
        self.finetune("single_fla", self.py, self.one_gpu + ["--no-save"] + self._fla_options(), gpus="0",
                      fla_unguarded=True)

    def ddp_fla(self) -> None:
        """`ddp` with the flags of `single_fla`."""
        self.finetune("ddp_fla", self.two + [str(DDP_YAML)], self.per_gpu + ["--no-save"] + self._fla_options(),
                      fla_unguarded=True)

    def _fla_options(self) -> list[str]:
        return ["--max-steps", str(self.args.fla_steps)] + ([] if self.smoke else ["--fused-ce"]) + self.bf16  # liger needs a GPU

    # ------------------------------------------------------------------------------------------------ evaluation

    def lm_eval_dp(self) -> None:
        """lm-eval on one GPU and data-parallel on two, the same saved folder and local tasks: plain lm-eval (the
        model's own code through trust_remote_code), then `m2rnn eval lm-eval`; per-document log-likelihoods and
        metrics compared."""
        folder = self.eval_model()
        if folder is None:
            return
        tasks_dir = self.out / "lm-eval-tasks"
        tasks = write_tasks(tasks_dir, choice_docs=8 if self.smoke else 200, generate_docs=4 if self.smoke else 16)
        device = "cpu" if self.smoke else "cuda"
        plain = ["--model", "hf", "--model_args", f"pretrained={folder},trust_remote_code=True,dtype=float32",
                 "--tasks", ",".join(tasks), "--include_path", str(tasks_dir), "--batch_size", "16", "--device", device,
                 "--log_samples", "--output_path"]
        ours = ["eval", "lm-eval", str(folder), "--tasks", ",".join(tasks), "--include-path", str(tasks_dir),
                "--batch-size", "16", "--dtype", "float32", "--log-samples", "--overwrite", "--output-dir"]
        for prefix, one, two, read in (
            ("lm_eval_dp", self.py + ["-m", "lm_eval"] + plain, self.two + [str(DDP_YAML), "-m", "lm_eval"] + plain,
             read_lm_eval_cli),
            ("lm_eval_dp_m2rnn", m2rnn_command() + ours, self.two + [str(DDP_YAML), "-m", "m2rnn"] + ours,
             read_m2rnn_lm_eval),
        ):
            folders = self.out / f"{prefix}-one", self.out / f"{prefix}-two"
            codes = [self.run(f"{prefix}_one", one + [str(folders[0])], self.timeout, gpus="0", env=OFFLINE),
                     self.run(f"{prefix}_two", two + [str(folders[1])], self.timeout, env=OFFLINE)]
            if codes == [0, 0]:
                comparison = compare_lm_eval(read(folders[0]), read(folders[1]))
                one_run, rank0 = (loglikelihood_requests((self.out / f"{prefix}_{run}.log").read_text())
                                  for run in ("one", "two"))
                comparison["loglikelihood_requests"] = {"one_process": one_run, "rank_0_of_two": rank0}
                comparison["split_across_ranks"] = bool(one_run and rank0 and rank0 < one_run)
                self.note(f"{prefix}_two", comparison, key="vs_one")

    def eval_dp(self) -> None:
        """`m2rnn eval niah` in one process and under `accelerate launch` on two GPUs: the results files compared."""
        folder = self.eval_model()
        if folder is None:
            return
        niah = ["eval", "niah", str(folder), "--tasks", "single_1", "--lengths", "512", "--limit",
                "2" if self.smoke else "8", "--overwrite", "--output-dir"]
        folders = self.out / "niah-one", self.out / "niah-two"
        codes = [self.run("eval_dp_one", m2rnn_command() + niah + [str(folders[0])], self.timeout, gpus="0",
                          env=OFFLINE),
                 self.run("eval_dp_two", self.two + [str(DDP_YAML), "-m", "m2rnn"] + niah + [str(folders[1])],
                          self.timeout, env=OFFLINE)]
        if codes == [0, 0]:
            comparison = compare_results_files(folders[0] / "results.json", folders[1] / "results.json")
            self.note("eval_dp_two", comparison, key="vs_one")

    def eval_model(self) -> Path | None:
        """The folder the evaluation phases load: `consolidate`'s when it exists, else a fresh PRESET model; once."""
        if not self._eval_model_prepared:
            self._eval_model_prepared = True
            folder = self.consolidated if (self.consolidated / "config.json").is_file() else self.out / "eval-model"
            code = self.run("eval_model", self.py + [__file__, "--output-dir", str(self.out), "--prepare-eval-model",
                                                     str(folder), "--preset", self.args.preset], self.timeout)
            self._eval_model = folder if code == 0 else None
        return self._eval_model

    # ------------------------------------------------------------------------------------------------ bookkeeping

    def finetune(self, name: str, launcher: list[str], options: list[str], gpus: str | None = None,
                 model: list[str] | None = None, fla_unguarded: bool = False) -> None:
        """One `finetune.py` run; its report (losses, tokens/s, peak memory) goes into results[name]."""
        report = self.out / f"{name}.json"
        model = model or ["--preset", self.args.preset]
        script = [str(FINETUNE)]
        if fla_unguarded:
            script = [str(Path(__file__).resolve()), "--worker"]
        command = launcher + script + model + [
            "--random-tokens", "400", "--max-length", "64" if self.smoke else str(self.args.max_length),
            "--lr", "3e-4", "--max-steps", str(self.args.steps), "--report", str(report),
        ] + options
        if self.args.pad_to_multiple_of is not None:
            command += ["--pad-to-multiple-of", str(self.args.pad_to_multiple_of)]
        report.unlink(missing_ok=True)  # a report of an earlier call would look like this run's
        self.run(name, command, self.timeout, gpus, report=report)
        self.merge_report(name, report)

    def run(self, name: str, command: list[str], timeout: float, gpus: str | None = None,
            env: dict[str, str] | None = None, report: Path | None = None) -> int | str:
        """`command` bounded by `timeout` (cut to the budget left); its output in OUT/NAME.log, its line, exit status
        and seconds in results[name]. A command that times out, or still runs EXIT_GRACE seconds after writing its
        `report` (its last act), is killed with every process it started."""
        marker = f"{os.getpid()}-{name}"
        environ = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}), **{RUN_MARKER: marker})
        if gpus is not None:
            environ["CUDA_VISIBLE_DEVICES"] = gpus
        line = " ".join(shlex.quote(part) for part in command)
        timeout = min(timeout, self.deadline - time.monotonic())
        if timeout < 20:
            print(f"\n=== {name}: skipped (time budget spent): {line}", flush=True)
            with self.lock:
                self.results["phases"][name] = {"command": line, "exit": "skipped"}
            return "skipped"
        print(f"\n=== {name}: {line}", flush=True)
        started = time.perf_counter()
        process = subprocess.Popen(command, env=environ, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        end, code = time.monotonic() + timeout, None
        while code is None:
            try:
                output, _ = process.communicate(timeout=5)
                code = process.returncode
            except subprocess.TimeoutExpired:
                hung = report is not None and report.is_file() and time.time() - report.stat().st_mtime > EXIT_GRACE
                if hung or time.monotonic() > end:
                    os.killpg(process.pid, signal.SIGKILL)
                    kill_marked(marker)  # the launcher's workers run in sessions of their own, hold the pipe and GPUs
                    output, _ = process.communicate(timeout=60)
                    code = f"killed: still running {EXIT_GRACE} s after writing its report" if hung else "timeout"
        (self.out / f"{name}.log").write_text(output)
        lines = [x for x in output.splitlines() if "Warning" not in x and "warn(" not in x]
        print("\n".join(lines[-25:]), flush=True)
        with self.lock:
            self.results["phases"][name] = {"command": line, "exit": code,
                                            "seconds": round(time.perf_counter() - started, 1)}
        self.save()
        return code

    def merge_report(self, name: str, report: Path) -> None:
        """A phase's own JSON report into results[name]."""
        if report.is_file():
            self.note(name, json.loads(report.read_text()))

    def note(self, name: str, value: Any, key: str | None = None) -> None:
        """Add `value` to results[name] (as results[name][key] with `key`, or merged; a string: its `note`)."""
        with self.lock:
            entry = self.results["phases"].setdefault(name, {})
            if key is not None:
                entry[key] = value
            elif isinstance(value, str):
                entry["note"] = value
                print(f"\n=== {name}: {value}", flush=True)
            else:
                entry.update(value)
        self.save()

    def save(self) -> None:
        with self.lock:
            (self.out / "results.json").write_text(json.dumps(self.results, indent=1))

    def _smoke_flag(self) -> list[str]:
        return ["--smoke"] if self.smoke else []


def kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment holds RUN_MARKER=`marker`: the processes one command started (Linux)."""
    needle = f"{RUN_MARKER}={marker}".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def m2rnn_command() -> list[str]:
    """The `m2rnn` console script a user runs (beside this Python), or `python -m m2rnn` where none is installed."""
    script = Path(sys.executable).with_name("m2rnn")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "m2rnn"]


def environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__}
    # module -> distributions that install it (liger_kernel has no __version__; fla comes as fla-core)
    for name, distributions in (("triton", ["triton"]), ("transformers", ["transformers"]),
                                ("accelerate", ["accelerate"]), ("liger_kernel", ["liger-kernel"]),
                                ("fla", ["fla-core", "flash-linear-attention"])):
        try:
            __import__(name)
        except Exception as error:  # not installed, or broken
            info[name] = f"missing ({type(error).__name__})"
            continue
        for distribution in distributions:
            try:
                info[name] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        else:
            info[name] = getattr(sys.modules[name], "__version__", "unknown")
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
    """The consolidated sharded checkpoint, loaded on the GPU (the CPU without one), equals the gathered final save,
    and loads without the package (on CPU, compared with the CPU logits of the package's load)."""
    import torch
    from transformers import AutoModelForCausalLM

    import m2rnn  # noqa: F401  (registers the model type)
    from m2rnn.apps.hub import load_without_package

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    ours = AutoModelForCausalLM.from_pretrained(consolidated, device_map=device).eval()
    load_seconds = time.perf_counter() - started
    reference = AutoModelForCausalLM.from_pretrained(full, device_map=device).eval().state_dict()
    state = ours.state_dict()
    same = state.keys() == reference.keys() and all(torch.equal(value, reference[key]) for key, value in state.items())
    input_ids = [[5, 17, 300 % ours.config.vocab_size, 42]]
    with torch.no_grad():
        logits = ours(torch.tensor(input_ids, device=device)).logits.float().cpu()
        cpu_logits = ours.cpu()(torch.tensor(input_ids)).logits
    isolated = load_without_package(consolidated, input_ids)
    result = {"device": str(next(iter(state.values())).device), "load_seconds": round(load_seconds, 1),
              "weights_equal_final_save": same, "tensors": len(state),
              "no_package_max_abs_diff": (isolated - cpu_logits).abs().max().item(),
              "device_vs_cpu_logits_max_abs_diff": (logits - cpu_logits).abs().max().item()}
    print(f"consolidate_check: {result}", flush=True)
    output.write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not args.smoke:
        import torch

        if torch.cuda.device_count() < 2:
            raise SystemExit(f"bench_distributed.py: error: needs two CUDA GPUs, found {torch.cuda.device_count()}; "
                             "--smoke runs the same phases with the tiny model on CPU")
    bench = Bench(args)
    for name in args.phases:
        if name != "memory":  # it runs beside `single`
            getattr(bench, name)()
    summarise(bench.results)
    bench.save()
    print(json.dumps(bench.results["summary"], indent=1), flush=True)
    return bench.results


def summarise(results: dict[str, Any]) -> None:
    """Loss differences against the one-GPU run, resume continuity, scaling."""
    phases = results["phases"]
    summary: dict[str, Any] = {}
    for reference, names in (("single", ("ddp", "fsdp2", "fsdp2_ac", "fsdp2_padded")),
                             ("fsdp2", ("fsdp2_ac", "fsdp2_padded")), ("single_fla", ("ddp_fla",))):
        expected = phases.get(reference, {}).get("losses")
        for name in names:
            losses = phases.get(name, {}).get("losses")
            if expected and losses:
                diffs = [abs(a - b) for a, b in zip(losses, expected)]
                summary[f"{name}_vs_{reference}"] = {"max_abs": max(diffs), "first": diffs[0], "steps": len(diffs)}
    resumed, full = phases.get("fsdp2_resume", {}), phases.get("fsdp2", {}).get("losses")
    if resumed.get("losses") and full:
        tail = full[resumed["first_step"]:]
        summary["resume_vs_uninterrupted_max_abs"] = max(abs(a - b) for a, b in zip(resumed["losses"], tail))
    single = phases.get("single", {}).get("tokens_per_second")
    for name in ("ddp", "fsdp2", "fsdp2_ac"):
        rate = phases.get(name, {}).get("tokens_per_second")
        if single and rate:
            summary[f"{name}_scaling"] = rate / single
    for name, entry in phases.items():
        if "vs_one" in entry:
            summary[name.removesuffix("_two") + "_vs_one_process"] = entry["vs_one"]
    single_fla, ddp_fla = (phases.get(name, {}).get("tokens_per_second") for name in ("single_fla", "ddp_fla"))
    if single_fla and ddp_fla:
        summary["ddp_fla_scaling"] = ddp_fla / single_fla
    results["summary"] = summary


if __name__ == "__main__":
    if "--worker" in sys.argv:  # finetune.py with fla's GDN backward guard lifted (timing only)
        sys.argv.remove("--worker")
        from bench_model import lift_fla_backward_guard

        print(lift_fla_backward_guard(), flush=True)
        sys.argv[0] = str(FINETUNE)
        import runpy

        runpy.run_path(str(FINETUNE), run_name="__main__")
    elif "--memory-probe" in sys.argv:
        out = Path(sys.argv[sys.argv.index("--output-dir") + 1])
        memory_probe("--smoke" in sys.argv, out / "memory.json")
    elif "--prepare-eval-model" in sys.argv:
        print(prepare_model(Path(sys.argv[sys.argv.index("--prepare-eval-model") + 1]),
                            sys.argv[sys.argv.index("--preset") + 1]), flush=True)
    elif "--check-consolidated" in sys.argv:
        i = sys.argv.index("--check-consolidated")
        out = Path(sys.argv[sys.argv.index("--output-dir") + 1])
        check_consolidated(Path(sys.argv[i + 1]), Path(sys.argv[i + 2]), out / "consolidate.json")
    else:
        main()
