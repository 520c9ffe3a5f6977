"""Every command README.md, docs/*.md and examples/README.md show runs, verbatim, the way a user runs it.

The commands are read from the Markdown at test time: each ```bash line (comments dropped, `\\` continuations
joined) and the README's inline `python examples/...` / `accelerate launch ...` commands, which it promises are
runnable. Each runs as written (same flags, progress bars on) through `bash -c` in a fresh working folder that
holds its placeholders as real tiny inputs: a folder named `MODEL`, `Qwen3.5-0.8B`, `path/to/gdn-hybrid`, a
`corpus.txt`, ... (`INPUTS`). A documented command without an entry in `CASES` fails (so a changed README line
needs its test changed too), and so does an entry whose command is no longer documented.

What a command must do (`Case.expect`):
- "success": exit 0 and write what it says it writes;
- "offline": it needs the network, which tests never have (HF_HUB_OFFLINE=1): exit 1 within `OFFLINE_SECONDS`
  (`Case.offline_seconds` where a case says why it needs longer) with ONE stderr line that names the way to run
  offline (`Case.hint`);
- "gpu": it needs CUDA; with a GPU it must succeed, without one it must refuse at once in one line naming CUDA.
The README's `python3 -m venv ... && pip install ... &&` prefix is dropped (the tests run in the installed
environment): its demo runs here, and its install-and-test line is checked to be a line of .ci/run, which runs it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "README.md"]
INSTALL_PREFIX = re.compile(r"^python3 -m venv \.venv && \. \.venv/bin/activate && pip install -q -c constraints\.txt -e \S+ && ")
INLINE_RUNNABLE = re.compile(r"`((?:python examples/|accelerate launch )[^`]+)`")
OFFLINE_SECONDS = 15.0
PROGRESS_BAR = re.compile(r"\d+%\|")  # a tqdm bar (progress bars stay on): not an error line
CI_COMMAND = "python -m pytest -q -n 2"  # the README install-and-test line: .ci/run runs it whole (tests/test_readme.py)


# ---------------------------------------------------------------------------------------------------------------
# The commands, as the Markdown shows them
# ---------------------------------------------------------------------------------------------------------------
def _strip_comment(line: str) -> str:
    """The line without a trailing shell comment (a `#` that starts a word outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def documented_commands() -> dict[str, list[str]]:
    """Each command → the files that show it, in the order they appear."""
    commands: dict[str, list[str]] = {}
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        found = []
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines():  # continuation lines joined
                command = _strip_comment(line)
                if command:
                    found.append(INSTALL_PREFIX.sub("", command))
        if path.name == "README.md" and path.parent == ROOT:
            found += [" ".join(match.split()) for match in INLINE_RUNNABLE.findall(text)]
        for command in found:
            commands.setdefault(command, []).append(str(path.relative_to(ROOT)))
    return commands


# ---------------------------------------------------------------------------------------------------------------
# The placeholders, as real tiny inputs
# ---------------------------------------------------------------------------------------------------------------
def _byte_tokenizer():
    from m2rnn.tokenization import byte_level_tokenizer

    return byte_level_tokenizer()


def make_model(folder: Path) -> None:
    """`MODEL`: the tiny M2RNN preset with the byte-level tokenizer it was built for."""
    from m2rnn import M2RNNConfig, M2RNNForCausalLM
    from m2rnn.tokenization import BYTE_VOCAB_SIZE

    torch.manual_seed(0)
    config = M2RNNConfig.from_preset("tiny", vocab_size=BYTE_VOCAB_SIZE, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=2, max_position_embeddings=4096)
    M2RNNForCausalLM(config).save_pretrained(folder)
    _byte_tokenizer().save_pretrained(folder)


def make_my_m2rnn(folder: Path) -> None:
    """`my-m2rnn` and the `results.json` beside it, as `m2rnn eval` writes a results table."""
    make_model(folder)
    (folder.parent / "results.json").write_text(json.dumps({"lambada_openai": {"acc": 0.25, "perplexity": 80.0}}))


def _qwen3_5(layers: int = 16):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(0)
    config = Qwen3_5TextConfig(
        vocab_size=260, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8,
        linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25,
                         "mrope_section": [1, 1, 0], "mrope_interleaved": True},
    )  # layer_types: attention at 3, 7, 11, 15 and Gated DeltaNet elsewhere, as in the real Qwen3.5-0.8B
    return Qwen3_5ForCausalLM(config)


def make_qwen3_5(folder: Path) -> None:
    """`Qwen3.5-0.8B`: a 16-layer Qwen3.5 of width 32 with the real one's layer pattern, and a tokenizer."""
    _qwen3_5().save_pretrained(folder)
    _byte_tokenizer().save_pretrained(folder)


def make_text(path: Path) -> None:
    """`corpus.txt` / `corpus.jsonl`: the examples' small English corpus."""
    text = (ROOT / "examples" / "data" / "tiny_corpus.txt").read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        text = "".join(json.dumps({"text": part}) + "\n" for part in text.split("\n\n") if part.strip())
    path.write_text(text, encoding="utf-8")


def make_longbench(folder: Path) -> None:
    """`LongBench/`: LongBench's data.zip unpacked (`data/<task>.jsonl`), two short trec examples."""
    (folder / "data").mkdir(parents=True)
    classes = ["Abbreviation", "Description and abstract concept", "Human being", "Location"]
    rows = [{"input": f"Who wrote letter {i}?", "context": "Question: What is an abbreviation?\nType: Abbreviation\n" * 4,
             "answers": [classes[i]], "all_classes": classes, "length": 40, "dataset": "trec", "language": "en",
             "_id": f"trec-{i}"} for i in range(2)]
    (folder / "data" / "trec.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _conversion_fixtures():
    """tests/test_conversion.py's tiny source checkpoints (one definition of each on-disk format)."""
    import test_conversion

    return test_conversion


def make_qwen3_5_moe(folder: Path) -> None:
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    fixtures = _conversion_fixtures()
    config = Qwen3_5MoeTextConfig(**fixtures.BASE, head_dim=16, rope_parameters=fixtures.QWEN_ROPE, **fixtures.MOE)
    Qwen3_5MoeForCausalLM(config).save_pretrained(folder)


def make_qwen3_next(folder: Path) -> None:
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    fixtures = _conversion_fixtures()
    config = Qwen3NextConfig(**fixtures.BASE, head_dim=16, intermediate_size=48, decoder_sparse_step=1,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25},
                             **fixtures.MOE)
    Qwen3NextForCausalLM(config).save_pretrained(folder)


def make_olmo_hybrid(folder: Path) -> None:
    from transformers import OlmoHybridConfig, OlmoHybridForCausalLM

    config = OlmoHybridConfig(**_conversion_fixtures().BASE, intermediate_size=48, linear_allow_neg_eigval=True)
    OlmoHybridForCausalLM(config).save_pretrained(folder)


def make_fla(folder: Path) -> None:
    fixtures = _conversion_fixtures()
    reference = fixtures.qwen3_5_text(tie=True, layer_types=["linear_attention"] * 3)
    fixtures.write_fla_checkpoint(folder, reference, [], tie=True)


def make_lm_engine(folder: Path) -> None:
    fixtures = _conversion_fixtures()
    fixtures.write_lm_engine_checkpoint(folder, fixtures.qwen3_5_text(tie=False), rope_dim=4)


SOURCE_FAMILIES: dict[str, Callable[[Path], None]] = {
    "qwen3_5": lambda folder: _conversion_fixtures().qwen3_5_text().save_pretrained(folder),
    "qwen3_5_moe": make_qwen3_5_moe,
    "qwen3_next": make_qwen3_next,
    "olmo_hybrid": make_olmo_hybrid,
    "gated_deltanet (fla)": make_fla,
    "gpt_base (lm-engine)": make_lm_engine,
}
"""`path/to/gdn-hybrid` as each family `m2rnn convert` reads (README's table): layer 0 is a GDN layer in each."""


INPUTS: dict[str, Callable[[Path], None]] = {
    "MODEL": make_model,
    "my-m2rnn": make_my_m2rnn,
    "Qwen3.5-0.8B": make_qwen3_5,
    "path/to/gdn-hybrid": make_qwen3_5,
    "corpus.txt": make_text,
    "corpus.jsonl": make_text,
    "LongBench": make_longbench,
}
"""Placeholder path → how to build it there (it may also write siblings, like `results.json`)."""


# ---------------------------------------------------------------------------------------------------------------
# What each command must do
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    inputs: tuple[str, ...] = ()
    expect: str = "success"  # "success", "offline" or "gpu"
    outputs: tuple[str, ...] = ()  # paths a successful run must have written
    hint: str = ""  # for "offline": a regular expression the one-line message must match (the offline way)
    stdout: str = ""  # a regular expression a successful run's stdout must match
    fake_hub: bool = False  # also push to a local fake Hub, which must receive the folder
    variants: dict[str, Callable[[Path], None]] | None = None  # run once per way of building `inputs[0]`
    timeout: float = 300.0
    slow: bool = False
    offline_seconds: float = OFFLINE_SECONDS  # for "offline": how soon it must fail


CASES: dict[str, Case] = {
    CI_COMMAND: Case(),
    # ----- the demo (README, docs/demo.md)
    "m2rnn demo": Case(outputs=("m2rnn-demo-output/results.md", "m2rnn-demo-output/s3_accuracy.png",
                                "m2rnn-demo-output/m2rnn-s3/config.json"), slow=True),
    "m2rnn demo --quick": Case(outputs=("m2rnn-demo-output/results.json",)),
    "python -m m2rnn demo --quick --output-dir out": Case(outputs=("out/results.md", "out/m2rnn-s3/config.json")),
    # ----- fine-tuning (README, docs/finetuning.md, examples/README.md)
    "python examples/finetune_trainer.py": Case(outputs=("runs/finetune_trainer/model.safetensors",),
                                                stdout=r"saved to runs/finetune_trainer"),
    "python examples/finetune_lora.py": Case(outputs=("runs/finetune_lora/adapter/adapter_config.json",
                                                      "runs/finetune_lora/merged/model.safetensors")),
    "accelerate launch --config_file examples/accelerate/ddp.yaml examples/finetune.py": Case(
        outputs=("runs/finetune/model.safetensors",), stdout=r"(?s)^(?!.*step   1/20.*step   1/20).*saved to runs/finetune"),
    "accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/finetune.py": Case(
        outputs=("runs/finetune/model.safetensors",), stdout=r"(?s)^(?!.*step   1/20.*step   1/20).*saved to runs/finetune"),
    "torchrun --standalone --nproc_per_node 2 examples/finetune.py --cpu --check-replicas": Case(
        outputs=("runs/finetune/model.safetensors",), stdout=r"weights identical on all 2 processes: True"),
    "accelerate launch --config_file examples/accelerate/ddp.yaml examples/finetune_trainer.py --bf16": Case(
        outputs=("runs/finetune_trainer/model.safetensors",)),
    "python examples/finetune.py --cpu --save-every 10 --checkpoint-dir runs/ckpt && python examples/finetune.py --cpu "
    "--resume-from runs/ckpt/step-10 --output-dir runs/resumed && python examples/finetune.py --consolidate "
    "runs/ckpt/step-20 --output-dir runs/consolidated": Case(
        outputs=("runs/ckpt/step-10/finetune_state.json", "runs/ckpt/step-20/model.safetensors",
                 "runs/resumed/model.safetensors", "runs/consolidated/model.safetensors",
                 "runs/consolidated/modeling_m2rnn.py"),
        stdout=r"resumed from runs/ckpt/step-10 after step 10(?s:.*)consolidated runs/ckpt/step-20"),
    "accelerate launch --config_file examples/accelerate/ddp.yaml -m m2rnn eval niah MODEL --tasks single_1 "
    "--lengths 512 --limit 2 --output-dir out/niah-dp": Case(
        inputs=("MODEL",), outputs=("out/niah-dp/results.json",), stdout=r"^(?!(?s:.*)results: (?s:.*)results: )"),
    # ----- healing (README, docs/healing.md)
    "python examples/heal_swapped_layer.py": Case(
        outputs=("heal-example-output/healed/results.json", "heal-example-output/healed/loss_curves.png"), slow=True),
    "m2rnn heal path/to/gdn-hybrid healed --swap-layers 5 --text-files corpus.txt": Case(
        inputs=("path/to/gdn-hybrid", "corpus.txt"), outputs=("healed/results.json", "healed/config.json"), slow=True, timeout=600),
    "m2rnn convert Qwen3.5-0.8B swapped --swap-layers 4,12": Case(inputs=("Qwen3.5-0.8B",),
                                                                  outputs=("swapped/config.json",)),
    "m2rnn heal Qwen3.5-0.8B healed --student swapped --dataset wikitext --dataset-config wikitext-103-raw-v1 "
    "--max-tokens 5000000 --block-size 512 --batch-size 8 --stage1-steps 500 --stage2-steps 1000 --dtype bfloat16":
        Case(inputs=("Qwen3.5-0.8B", "swapped"), expect="offline", hint=r"--text-files|a local path"),
    "m2rnn heal Qwen3.5-0.8B healed --swap-layers 4,12 --init fresh --text-files corpus.jsonl": Case(
        inputs=("Qwen3.5-0.8B", "corpus.jsonl"), outputs=("healed/results.json",), slow=True, timeout=600),
    # ----- publishing (README)
    "m2rnn card my-m2rnn --results results.json": Case(inputs=("my-m2rnn",), stdout=r"lambada_openai"),
    "m2rnn push my-m2rnn me/my-m2rnn --check-only": Case(inputs=("my-m2rnn",)),
    "m2rnn push my-m2rnn me/my-m2rnn --private": Case(inputs=("my-m2rnn",), expect="offline", hint="--check-only",
                                                      fake_hub=True),
    # ----- evaluation (README)
    # lm-eval's TaskManager indexes its thousands of task YAMLs before a task can fail: ~10 s on an idle 2-core
    # machine, 16.3-16.6 s with it shared (stops 21 and 23), so this one gets 30 s
    "m2rnn eval lm-eval MODEL --tasks lambada_openai,hellaswag,piqa --batch-size 16 --output-dir out/lm-eval": Case(
        inputs=("MODEL",), expect="offline", hint="--include-path", offline_seconds=30.0),
    "m2rnn eval lm-eval MODEL --tasks m2rnn_example_choice,m2rnn_example_generate --include-path examples/lm_eval_tasks --output-dir out/lm-eval-local":
        Case(inputs=("MODEL",), outputs=("out/lm-eval-local/results.json",)),
    "m2rnn eval longbench MODEL --tasks paper --max-length 31500 --batch-size 4 --output-dir out/longbench": Case(
        inputs=("MODEL",), expect="offline", hint="--data-dir"),
    "m2rnn eval longbench MODEL --tasks trec --data-dir LongBench --output-dir out/longbench-local": Case(
        inputs=("MODEL", "LongBench"), outputs=("out/longbench-local/results.json",
                                                "out/longbench-local/predictions/trec.jsonl")),
    "m2rnn eval niah MODEL --lengths 1K,2K --depths 0,1 --limit 1 --output-dir out/niah": Case(
        inputs=("MODEL",), outputs=("out/niah/results.json", "out/niah/niah_heatmap.png")),
    "m2rnn eval s3 MODEL --lengths 4,8,16,32,64,128,256,512 --train-length 128 --limit 16 --output-dir out/s3": Case(
        inputs=("MODEL",), outputs=("out/s3/results.json",)),
    # ----- conversion (README)
    "m2rnn convert path/to/gdn-hybrid out/imported": Case(
        inputs=("path/to/gdn-hybrid",), variants=SOURCE_FAMILIES, outputs=("out/imported/config.json",)),
    "m2rnn convert path/to/gdn-hybrid out/swapped --swap-layers 0 --init fresh": Case(
        inputs=("path/to/gdn-hybrid",), variants=SOURCE_FAMILIES, outputs=("out/swapped/config.json",)),
    "m2rnn convert Qwen3.5-0.8B out/qwen35-m2rnn --swap-layers 0,12 --init transplant --dtype bf16 --verify": Case(
        inputs=("Qwen3.5-0.8B",), outputs=("out/qwen35-m2rnn/config.json",), stdout=r"(?i)max.*diff"),
    # ----- speed (docs/speed.md)
    "python benchmarks/bench_model.py": Case(expect="gpu"),
    "python benchmarks/bench_model.py --quick": Case(expect="gpu"),
    "python benchmarks/bench_model.py --only decode --models hybrid-m2rnn,llama --contexts 1024": Case(expect="gpu"),
    "python benchmarks/bench_model.py --fla-unguarded --only train --models hybrid-gdn,hybrid-gdn-m2rnn-1l --quick":
        Case(expect="gpu"),
    "python benchmarks/bench_model.py --device cpu --preset-scale tiny --output-dir /tmp/bench": Case(
        outputs=("/tmp/bench/model_results.md",)),
}
"""Command, exactly as documented → what it needs and must do. `inputs` that are not `INPUTS` names are the
outputs of another documented command, made by running it first (`PRODUCED_BY`)."""

PRODUCED_BY = {"swapped": "m2rnn convert Qwen3.5-0.8B swapped --swap-layers 4,12"}

DOCUMENTED = documented_commands()


def test_every_case_is_documented():
    """An entry whose command left the docs is stale: its test no longer tests what users read."""
    stale = [command for command in CASES if command not in DOCUMENTED]
    assert not stale, f"commands tested here but shown nowhere in {[str(p.relative_to(ROOT)) for p in DOC_FILES]}: {stale}"


# ---------------------------------------------------------------------------------------------------------------
# Running them
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built_inputs(tmp_path_factory) -> Path:
    """Every placeholder built once; each command's folder gets copies, so no run sees another's changes."""
    root = tmp_path_factory.mktemp("placeholders")
    for name, make in INPUTS.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        make(target)
    return root


def child_env(workdir: Path, **extra: str) -> dict[str, str]:
    """The user's environment: the test's Python first on PATH (its `m2rnn`, `accelerate`, `torchrun`), this
    checkout importable, no network, and a Hugging Face cache of its own."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTEST_", "HF_", "TRANSFORMERS_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=f"{ROOT}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(ROOT),
        HF_HOME=str(workdir / ".hf-home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def prepare(workdir: Path, case: Case, built_inputs: Path, variant: str | None = None) -> None:
    (workdir / "examples").symlink_to(ROOT / "examples")  # read-only here: scripts write under runs/ in workdir
    (workdir / "benchmarks").mkdir()
    for script in (ROOT / "benchmarks").glob("*.py"):  # copied: bench_model.py writes beside itself by default
        shutil.copy(script, workdir / "benchmarks" / script.name)
    for name in case.inputs:
        if variant is not None and name == case.inputs[0]:
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            case.variants[variant](workdir / name)
            continue
        if name in PRODUCED_BY:
            run(PRODUCED_BY[name], workdir, child_env(workdir)).check_returncode()
            continue
        source, target = built_inputs / name, workdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
        if name == "my-m2rnn":
            shutil.copy(built_inputs / "results.json", workdir / "results.json")


def kill_processes_in(workdir: Path) -> None:
    """SIGKILL every process whose working directory lies in `workdir` (Linux /proc; elsewhere nothing)."""
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if Path(os.readlink(entry / "cwd")).is_relative_to(workdir.resolve()):
                os.kill(int(entry.name), 9)
        except (OSError, ValueError):
            continue


def run(command: str, workdir: Path, env: dict[str, str], timeout: float = 300.0) -> subprocess.CompletedProcess:
    """`bash -c command` in `workdir`; past `timeout` its whole process group is killed (launchers start children)."""
    process = subprocess.Popen(["bash", "-c", command], cwd=workdir, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        kill_processes_in(workdir)  # launchers' workers run in sessions of their own and keep the pipes open
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"`{command}` still ran after {timeout:.0f} s\n--- stdout (tail)\n{stdout[-3000:]}\n"
                    f"--- stderr (tail)\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def describe(command: str, result: subprocess.CompletedProcess) -> str:
    return f"`{command}` exited {result.returncode}\n--- stdout (tail)\n{result.stdout[-3000:]}\n--- stderr (tail)\n{result.stderr[-3000:]}"


def assert_fails_fast_in_one_line(command: str, workdir: Path, env: dict[str, str], mention: str,
                                  bound: float = OFFLINE_SECONDS) -> None:
    started = time.perf_counter()
    result = run(command, workdir, env, timeout=4 * bound)
    seconds = time.perf_counter() - started
    lines = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert result.returncode == 1, describe(command, result)
    assert seconds < bound, f"`{command}` took {seconds:.1f} s to fail offline\n{describe(command, result)}"
    assert len(lines) == 1, f"`{command}` must fail in one stderr line, got {len(lines)}\n{describe(command, result)}"
    assert re.search(mention, lines[0], re.I), f"the error should name {mention!r}: {lines[0]}"


def _params():
    params = []
    for command, files in DOCUMENTED.items():
        case = CASES.get(command)
        marks = [pytest.mark.slow] if case is not None and case.slow else []
        for variant in (case.variants if case is not None and case.variants else [None]):
            label = f" [{variant}]" if variant else ""
            params.append(pytest.param(command, variant, id=f"{files[0]}: {command[:90]}{label}", marks=marks))
    return params


@pytest.mark.parametrize(("command", "variant"), _params())
def test_documented_command(command, variant, built_inputs, tmp_path):
    case = CASES.get(command)
    assert case is not None, (
        f"`{command}` ({', '.join(DOCUMENTED[command])}) has no entry in CASES: every documented command is run "
        "as written, so register how to prepare its inputs and what it must produce"
    )
    if command == CI_COMMAND:  # the whole README line, install included, is a line of .ci/run
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        assert any(line.endswith(f"&& {command}") and f"\n{line}\n" in readme for line in ci_lines)
        return
    workdir = tmp_path / "work"
    workdir.mkdir()
    prepare(workdir, case, built_inputs, variant)
    env = child_env(workdir)
    if case.expect == "offline":
        before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and ".hf-home" not in p.parts
                  and "examples" not in p.parts and "benchmarks" not in p.parts}
        assert_fails_fast_in_one_line(command, workdir, env, case.hint, case.offline_seconds)
        after = {p: p.read_bytes() for p in before}
        assert after == before, f"`{command}` changed its inputs although it failed"
        if case.fake_hub:
            with FakeHub() as hub:
                result = run(command, workdir, child_env(workdir, HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.endpoint,
                                                           HF_TOKEN="hf_fake_token"), case.timeout)
            assert result.returncode == 0, describe(command, result)
            repo = command.split()[3]
            assert hub.repos[repo].get("private") is True or hub.repos[repo].get("visibility") == "private"
            sent = hub.files[f"{repo}@main"]
            folder = workdir / command.split()[2]
            assert {"config.json", "model.safetensors", "README.md", "modeling_m2rnn.py"} <= set(sent)
            assert sent["model.safetensors"] == (folder / "model.safetensors").read_bytes()
        return
    if case.expect == "gpu" and not torch.cuda.is_available():
        assert_fails_fast_in_one_line(command, workdir, env, r"CUDA|GPU")
        return
    started = time.time()
    result = run(command, workdir, env, case.timeout)
    assert result.returncode == 0, describe(command, result)
    for output in case.outputs:
        path = Path(output) if os.path.isabs(output) else workdir / output
        assert path.exists() and path.stat().st_mtime >= started - 1, f"`{command}` did not write {output}\n{describe(command, result)}"
    if case.stdout:
        assert re.search(case.stdout, result.stdout), f"stdout should match {case.stdout!r}\n{describe(command, result)}"


# ---------------------------------------------------------------------------------------------------------------
# A local stand-in for the Hub's upload API (loopback only)
# ---------------------------------------------------------------------------------------------------------------
class FakeHub:
    """The endpoints `m2rnn push` calls (repo creation, branch, preupload, commit), served on 127.0.0.1; every
    file is answered "regular" at preupload so it arrives inline in the commit. Records what it receives."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._reply(404, {"error": "Repository not found"})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, reply = hub.answer(self.path.split("?")[0], body)
                self._reply(status, reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, path: str, body: bytes) -> tuple[int, object]:
        if path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
            self.repos[repo_id] = request
            return 200, {"url": f"{self.endpoint}/{repo_id}"}
        if path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        parts = path.split("/")
        if path.startswith("/api/models/") and len(parts) > 5:
            repo_id, action, revision = "/".join(parts[3:5]), parts[5], "/".join(parts[6:])
            if action == "preupload":
                files = json.loads(body)["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in files], "commitOid": "0" * 40}
            if action == "branch":
                return 200, {}
            if action == "commit":
                received = self.files.setdefault(f"{repo_id}@{revision}", {})
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        received[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                return 200, {"commitOid": "1" * 40, "commitUrl": f"{self.endpoint}/{repo_id}/commit/1"}
        return 404, {"error": f"not in the fake hub: {path}"}

    def __enter__(self) -> "FakeHub":
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------------------------------------
# The examples follow the project's output rule
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["finetune.py", "finetune_trainer.py", "finetune_lora.py", "heal_swapped_layer.py"])
def test_examples_never_replace_a_folder_they_did_not_write(script, tmp_path):
    """`--overwrite` on a folder of the user's is refused in one line before any training, and the folder is kept
    (heal_swapped_layer.py used to delete --output-dir whatever it was)."""
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "mine.txt").write_text("mine")
    command = f"python examples/{script} --output-dir notes --overwrite"
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    started = time.perf_counter()
    result = run(command, tmp_path, child_env(tmp_path), timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert result.returncode == 1 and "was not written by m2rnn" in lines[-1], describe(command, result)
    assert len(lines) == 1 and time.perf_counter() - started < 30, describe(command, result)
    assert sorted(p.name for p in keep.iterdir()) == ["mine.txt"] and (keep / "mine.txt").read_text() == "mine"
