"""Healing after `swap_layers` (m2rnn.apps.heal): stage 1 lowers the replaced-layer MSE and moves only the new layers,
stage 2 lowers the KL to the teacher, the CLI writes its folder and refuses to overwrite, bad input names the key.

Tiny byte-level GDN hybrids (random init, initializer_range 0.1 so that the teacher's logits are far from uniform)
on the shipped example text; one CPU thread, since these models are too small to gain from more.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from m2rnn import M2RNNConfig, M2RNNForCausalLM
from m2rnn.apps.cli import main
from m2rnn.apps.conversion import swap_layers
from m2rnn.apps.heal import (
    HealError,
    HealSettings,
    TextSource,
    byte_level_tokenizer,
    distillation_kl,
    heal_stage1,
    heal_stage2,
    load_text_blocks,
    replaced_layer_mse,
    swapped_layers,
)
from m2rnn.apps.heal.healing import teacher_mixer_io

TEXT = Path(__file__).parents[1] / "examples" / "data" / "heal" / "river_town.txt"
SWAPPED = 1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> M2RNNConfig:
    settings = dict(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        mixer_types=["gated_deltanet", "gated_deltanet", "full_attention"], initializer_range=0.1,
        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        num_attention_heads=2, num_key_value_heads=2, rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 1.0},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return M2RNNConfig(**{**settings, **overrides})


def tiny_teacher(seed: int = 0, **overrides) -> M2RNNForCausalLM:
    torch.manual_seed(seed)
    return M2RNNForCausalLM(tiny_config(**overrides)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def blocks(tokenizer):
    return load_text_blocks(TextSource(files=[TEXT]), tokenizer, block_size=24)


def fast_settings(**overrides) -> HealSettings:
    values = dict(batch_size=8, stage1_steps=50, stage1_lr=3e-3, stage2_steps=30, stage2_lr=3e-3, eval_every=1000,
                  max_eval_blocks=8, progress=False)
    return HealSettings(**{**values, **overrides})


# ---------------------------------------------------------------------------------------------------------------
# Stage 1
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_stage1_feeds_the_normed_hidden_state_the_teacher_mixer_saw(blocks):
    teacher = tiny_teacher()
    ids = blocks.eval[:2]
    records = teacher_mixer_io(teacher, ids, [0, SWAPPED])
    hidden = teacher.model.embed_tokens(ids)
    for i in (0, SWAPPED):
        layer = teacher.model.layers[i]
        x, y = records[i]
        torch.testing.assert_close(x, layer.input_layernorm(hidden), rtol=0, atol=0)
        torch.testing.assert_close(y, layer.mixer(x), rtol=0, atol=0)
        hidden = layer(hidden)


@pytest.fixture(scope="module")
def stage1_run(blocks):
    """Teacher, student before and after stage 1, and the held-out MSE before and after."""
    teacher = tiny_teacher()
    student = swap_layers(copy.deepcopy(teacher), [SWAPPED], init="transplant")
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_state = {k: v.clone() for k, v in student.state_dict().items()}
    held_out = blocks.eval[:8]
    mse_before = replaced_layer_mse(teacher, student, held_out, [SWAPPED])[SWAPPED]["mse"]
    log = heal_stage1(teacher, student, blocks, [SWAPPED], fast_settings())
    mse_after = replaced_layer_mse(teacher, student, held_out, [SWAPPED])[SWAPPED]["mse"]
    return dict(teacher=teacher, teacher_state=teacher_state, student=student, before_state=before_state,
                mse_before=mse_before, mse_after=mse_after, log=log)


def test_stage1_reduces_replaced_layer_mse_on_held_out_text(stage1_run):
    assert stage1_run["mse_after"] < 0.25 * stage1_run["mse_before"], stage1_run
    log = stage1_run["log"]
    assert log.eval[0][1] == pytest.approx(stage1_run["mse_before"], rel=1e-5)  # the curve starts at "before"
    assert log.eval[-1][1] < log.eval[0][1] and len(log.train) == 50


def test_stage1_trains_only_the_new_layer(stage1_run):
    student, before = stage1_run["student"], stage1_run["before_state"]
    new_prefix = f"model.layers.{SWAPPED}.mixer."
    after = student.state_dict()
    assert after.keys() == before.keys()
    changed_new = [name for name in after if name.startswith(new_prefix) and not torch.equal(after[name], before[name])]
    others = [name for name in after if not name.startswith(new_prefix)]
    assert all(torch.equal(after[name], before[name]) for name in others)  # bit-identical
    assert set(changed_new) == {n for n in after if n.startswith(new_prefix)}  # every tensor of the new mixer moved
    assert stage1_run["log"].trainable_parameters == sum(
        p.numel() for p in student.model.layers[SWAPPED].mixer.parameters()
    )
    teacher = stage1_run["teacher"].state_dict()
    assert all(torch.equal(teacher[name], value) for name, value in stage1_run["teacher_state"].items())


# ---------------------------------------------------------------------------------------------------------------
# Stage 2
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_stage2_reduces_kl_on_held_out_text(blocks, mode):
    teacher = tiny_teacher()
    student = swap_layers(copy.deepcopy(teacher), [SWAPPED], init="fresh")
    held_out = blocks.eval[:8]
    kl_before = distillation_kl(teacher, student, held_out)
    healed, log = heal_stage2(teacher, student, blocks, [SWAPPED], fast_settings(stage2=mode, stage2_steps=25))
    kl_after = distillation_kl(teacher, healed, held_out)
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after)
    assert type(healed) is M2RNNForCausalLM  # LoRA adapters merged away
    assert not any("lora" in name for name in healed.state_dict())
    assert log.eval[0][1] == pytest.approx(kl_before, rel=1e-4)
    if mode == "lora":  # adapters and the whole new mixer, far fewer than the model
        new_mixer = sum(p.numel() for p in healed.model.layers[SWAPPED].mixer.parameters())
        assert new_mixer < log.trainable_parameters < healed.num_parameters() // 2


# ---------------------------------------------------------------------------------------------------------------
# Which layers, and refusals
# ---------------------------------------------------------------------------------------------------------------
def test_swapped_layers_from_configs_and_errors_name_the_key():
    teacher = tiny_config()
    student = swap_layers(teacher, [0, 1])
    assert swapped_layers(teacher, student) == [0, 1]
    assert swapped_layers(teacher, student, layers=[1]) == [1]
    for key, value in (("num_hidden_layers", 4), ("vocab_size", 300), ("hidden_size", 48)):
        other = tiny_config(**{key: value}, mixer_types=["m2rnn"] * (value if key == "num_hidden_layers" else 3))
        with pytest.raises(HealError, match=f"`{key}`"):
            swapped_layers(teacher, other)
    with pytest.raises(HealError, match="no swapped layer found"):
        swapped_layers(teacher, teacher)
    with pytest.raises(HealError, match="`layers` entry 2.*'full_attention'"):
        swapped_layers(teacher, student, layers=[2])
    with pytest.raises(HealError, match="outside 0..2"):
        swapped_layers(teacher, student, layers=[7])
    attention_swapped = tiny_config(mixer_types=["gated_deltanet", "gated_deltanet", "gated_deltanet"])
    with pytest.raises(HealError, match=r"`mixer_types\[2\]`"):
        swapped_layers(teacher, attention_swapped)
    with pytest.raises(HealError, match="stage2='adapters'"):
        HealSettings(stage2="adapters")
    with pytest.raises(HealError, match="temperature=0"):
        HealSettings(temperature=0)


def test_text_blocks_from_txt_jsonl_and_datasets(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("abcdefgh")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "ijklmnop"}) + "\n\n" + json.dumps({"body": "qrst"}) + "\n")
    blocks = load_text_blocks(
        TextSource(files=[tmp_path / "a.txt", tmp_path / "b.jsonl"], text_column="body"), tokenizer, block_size=4,
        eval_fraction=0.2,
    )
    eos = [tokenizer.eos_token_id]
    expected = [*tokenizer("abcdefgh")["input_ids"], *eos, *tokenizer("ijklmnop")["input_ids"], *eos,
                *tokenizer("qrst")["input_ids"], *eos]  # 23 tokens: 5 blocks, the last 3 tokens dropped
    assert torch.cat([blocks.train.flatten(), blocks.eval.flatten()]).tolist() == expected[:20]
    assert blocks.summary() == {"block_size": 4, "train_blocks": 4, "eval_blocks": 1}  # held out: the end
    with pytest.raises(HealError, match=r"b.jsonl:1: no text field 'text' \(text_column\)"):
        load_text_blocks(TextSource(files=[tmp_path / "b.jsonl"]), tokenizer, block_size=4)
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(HealError, match="unsupported suffix '.csv'"):
        load_text_blocks(TextSource(files=[tmp_path / "c.csv"]), tokenizer)
    with pytest.raises(HealError, match="too little text"):
        load_text_blocks(TextSource(files=[tmp_path / "a.txt"]), tokenizer, block_size=64)

    # a `datasets` dataset: a local folder of JSON lines, held-out blocks from its own split
    data = tmp_path / "dataset"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"content": "abcdefgh" * 3}) + "\n" for _ in range(4)))
    (data / "test.jsonl").write_text(json.dumps({"content": "zyxwvuts"}) + "\n")
    source = TextSource(dataset=str(data), eval_split="test", text_column="content")
    from_dataset = load_text_blocks(source, tokenizer, block_size=8)
    assert from_dataset.summary() == {"block_size": 8, "train_blocks": 12, "eval_blocks": 1}
    assert tokenizer.decode(from_dataset.eval[0]) == "zyxwvuts"
    with pytest.raises(HealError, match="no text column 'text' \\(text_column\\); columns: \\['content'\\]"):
        load_text_blocks(TextSource(dataset=str(data)), tokenizer, block_size=8)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """A saved teacher (with tokenizer), a saved swapped student (without), local .txt and .jsonl text."""
    root = tmp_path_factory.mktemp("heal_cli")
    teacher = tiny_teacher()
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    swap_layers(copy.deepcopy(teacher), [SWAPPED], init="transplant").save_pretrained(root / "student")
    text = TEXT.read_text()
    (root / "part1.txt").write_text(text[:3000])
    lines = [json.dumps({"text": paragraph}) for paragraph in text[3000:6000].split("\n\n")]
    (root / "part2.jsonl").write_text("\n".join(lines) + "\n")
    return root


def heal_args(root: Path, output: Path, *extra: str) -> list[str]:
    return [
        "heal", str(root / "teacher"), str(output), "--text-files", str(root / "part1.txt"), str(root / "part2.jsonl"),
        "--block-size", "16", "--batch-size", "4", "--stage1-steps", "6", "--stage2-steps", "4", "--eval-every", "3",
        "--max-eval-blocks", "4", "--no-progress", *extra,
    ]


def test_cli_heals_writes_the_folder_and_refuses_to_overwrite(checkpoints, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = tmp_path / "healed"
    assert main(heal_args(checkpoints, output, "--student", str(checkpoints / "student"))) == 0
    printed = capsys.readouterr().out
    assert "healed layers [1]" in printed and "KL(teacher || student)" in printed
    for name in ("config.json", "model.safetensors", "tokenizer.json", "results.json", "results.md", "loss_curves.png"):
        assert (output / name).is_file(), name
    assert (output / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((output / "results.json").read_text())
    assert results["layers"] == [SWAPPED]
    assert [stage["name"] for stage in results["stages"]] == ["stage 1: layer matching", "stage 2: distillation (lora)"]
    assert [step for step, _ in results["stages"][0]["eval"]] == [0, 3, 6]
    assert set(results["before"]) == {"replaced_layer_mse", "kl", "student_lm_loss", "teacher_lm_loss"}
    assert results["data"]["block_size"] == 16 and results["text"][0].endswith("part1.txt")
    assert "| after stage 2 |" in (output / "results.md").read_text()
    healed = AutoModelForCausalLM.from_pretrained(output)
    assert healed.config.mixer_types == ["gated_deltanet", "m2rnn", "full_attention"]
    assert len(AutoTokenizer.from_pretrained(output)) == 260
    name = "model.layers.1.mixer.in_proj.weight"
    student = AutoModelForCausalLM.from_pretrained(checkpoints / "student").state_dict()
    assert not torch.equal(healed.state_dict()[name], student[name])  # the saved model is the healed one

    stamp = (output / "results.json").read_text()
    assert main(heal_args(checkpoints, output, "--student", str(checkpoints / "student"))) == 1
    error = capsys.readouterr().err
    assert "exists" in error and "--overwrite" in error
    assert (output / "results.json").read_text() == stamp  # untouched

    # --swap-layers swaps the teacher here; --overwrite replaces the folder; --stage2 full
    assert main(heal_args(checkpoints, output, "--swap-layers", "0", "--init", "fresh", "--stage2", "full",
                          "--overwrite")) == 0
    results = json.loads((output / "results.json").read_text())
    assert results["layers"] == [0] and results["stages"][1]["name"] == "stage 2: distillation (full)"
    assert not list(tmp_path.glob(".healed.*"))  # no staging leftovers


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_tokenizer", "no tokenizer files in"),
        ("bad_column", "no text field 'body' (text_column)"),
        ("layer_not_m2rnn", "`layers` entry 2: the student's layer 2 is 'full_attention'"),
        ("vocab_mismatch", "teacher and student differ in `vocab_size`: teacher 260, student 300"),
        ("layers_with_swap", "--layers goes with --student"),
        ("missing_file", "does not exist"),
        ("folder_as_text", "is a folder, not a file (--text-files"),
        ("binary_text", "is not UTF-8 text"),
        ("threads_0", "--threads 0 must be at least 1"),
        ("tokenizer_path", "--tokenizer './no/such/tokenizer': no such tokenizer folder"),
        ("tokenizer_offline", "--tokenizer 'someone/tokenizer' is not a local tokenizer folder and the Hub cannot be "
                              "reached"),
        ("dataset_offline", "--dataset 'someone/corpus' is not a local dataset folder or builder and the Hub cannot"),
    ],
)
def test_cli_bad_input_names_the_key(checkpoints, tmp_path, capsys, monkeypatch, case, message):
    student = ["--student", str(checkpoints / "student")]
    output = tmp_path / "out"
    args = heal_args(checkpoints, output, *student)
    if case == "no_tokenizer":
        bare_teacher = tmp_path / "bare_teacher"  # no tokenizer files, here or in the student folder
        tiny_teacher().save_pretrained(bare_teacher)
        args[1] = str(bare_teacher)
    elif case == "bad_column":
        args += ["--text-column", "body"]
    elif case == "layer_not_m2rnn":
        args += ["--layers", "2"]
    elif case == "vocab_mismatch":
        other = tmp_path / "other"
        swap_layers(tiny_teacher(vocab_size=300), [SWAPPED]).save_pretrained(other)
        args[args.index("--student") + 1] = str(other)
    elif case == "layers_with_swap":
        args = heal_args(checkpoints, output, "--swap-layers", "1", "--layers", "1")
    elif case == "missing_file":
        args[args.index("--text-files") + 1] = str(tmp_path / "nope.txt")
    elif case == "folder_as_text":
        (tmp_path / "texts").mkdir()
        args[args.index("--text-files") + 1] = str(tmp_path / "texts")
    elif case == "binary_text":
        (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00 not text")
        args[args.index("--text-files") + 1] = str(tmp_path / "binary.txt")
    elif case == "threads_0":
        args += ["--threads", "0"]
    elif case.startswith(("tokenizer", "dataset")):
        import huggingface_hub

        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # refused at once
        monkeypatch.chdir(tmp_path)
        if case == "tokenizer_path":
            args += ["--tokenizer", "./no/such/tokenizer"]
        elif case == "tokenizer_offline":
            args += ["--tokenizer", "someone/tokenizer"]
        else:
            files = args.index("--text-files")
            args[files: files + 3] = ["--dataset", "someone/corpus"]
    capsys.readouterr()  # the test's own saves above
    started = time.monotonic()
    assert main(args) == 1
    assert time.monotonic() - started < 30  # no half minute of retries
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not output.exists()


# ---------------------------------------------------------------------------------------------------------------
# The entry point as a user runs it: output safety, provenance, file modes, the plan, progress bars, --help
# ---------------------------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def run_m2rnn(*args: str, cwd: Path, umask: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`m2rnn ARGS` through the installed console script, importing this checkout's package."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(Path(sys.executable).parent / "m2rnn"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("output", ["teacher", "teacher/healed", "."])
def test_cli_never_writes_over_or_into_an_input(checkpoints, output):
    """Today's main replaced the teacher with the student (`m2rnn heal T T ... --overwrite`)."""
    before = _tree(checkpoints / "teacher")
    result = run_m2rnn("heal", "teacher", output, "--swap-layers", "1", "--text-files", "part1.txt", "--overwrite",
                       cwd=checkpoints)
    assert result.returncode == 1, result.stderr
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("m2rnn heal: error: OUT"), result.stderr
    assert _tree(checkpoints / "teacher") == before
    assert not list(checkpoints.glob(".*.partial")) and not list(checkpoints.glob("teacher/.*"))


def test_cli_entry_point_records_provenance_prints_its_plan_and_honours_the_umask(checkpoints, tmp_path):
    """Default flags (progress bars on), a converted student: the healed config keeps the conversion and adds the
    healing, the card says so, the plan and estimate come first, every file is 0644 under umask 022."""
    from transformers import AutoConfig

    student = tmp_path / "converted"
    model = AutoModelForCausalLM_from(checkpoints / "student")
    model.config.conversion = {"source": "Qwen/Qwen3.5-0.8B", "source_model_type": "qwen3_5", "swapped_layers": [1],
                               "init": "transplanted from the Gated DeltaNet layer", "license": "apache-2.0"}
    model.save_pretrained(student)
    result = run_m2rnn(
        "heal", str(checkpoints / "teacher"), "healed", "--student", str(student), "--text-files",
        str(checkpoints / "part1.txt"), "--block-size", "16", "--batch-size", "4", "--stage1-steps", "3",
        "--stage2-steps", "2", "--eval-every", "2", "--max-eval-blocks", "2", "--dtype", "fp32",
        cwd=tmp_path, umask=0o022,
    )
    assert result.returncode == 0, result.stderr
    plan = [line for line in result.stderr.splitlines() if line.startswith("m2rnn heal: ")]
    assert [line.split(":")[1].split()[0] for line in plan] == ["healing", "data", "stage", "estimate"], result.stderr
    assert "blocks of 16 tokens" in plan[1] and "3 steps" in plan[2] and "about" in plan[3]
    assert result.stderr.index("estimate:") < result.stderr.index("stage 1: layer matching:")  # before training

    healed = tmp_path / "healed"
    conversion = AutoConfig.from_pretrained(healed).conversion
    assert conversion["source"] == "Qwen/Qwen3.5-0.8B" and conversion["swapped_layers"] == [1]
    assert conversion["init"].startswith("transplanted") and conversion["license"] == "apache-2.0"
    assert conversion["healing"]["teacher"] == str(checkpoints / "teacher")
    assert conversion["healing"]["stages"] == ["stage 1: layer matching (3 steps)",
                                               "stage 2: distillation (lora) (2 steps)"]
    card = (healed / "README.md").read_text()
    assert "**Converted from** [Qwen/Qwen3.5-0.8B]" in card and "**Healing:** teacher = " in card
    assert "paper's initialisation" not in card
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in healed.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes


def AutoModelForCausalLM_from(folder: Path) -> M2RNNForCausalLM:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def test_no_progress_hides_every_bar_and_the_swap_here_is_recorded(checkpoints, tmp_path, capsys):
    output = tmp_path / "healed"
    assert main(heal_args(checkpoints, output, "--swap-layers", "1", "--init", "fresh", "--stage2", "none",
                          "--dtype", "float32")) == 0
    err = capsys.readouterr().err
    assert "it/s" not in err and "Loading weights" not in err and "Writing model shards" not in err, err
    assert "m2rnn heal: estimate: about" in err
    conversion = json.loads((output / "config.json").read_text())["conversion"]
    assert conversion["source"] == str((checkpoints / "teacher").resolve())  # a local folder, never a repo id
    assert conversion["swapped_layers"] == [1] and conversion["init"].startswith("the paper's initialisation")
    assert "source_model_type" not in conversion  # the teacher is already an m2rnn folder
    assert "(a local checkpoint)" in (output / "README.md").read_text()


def test_dtype_spellings_and_bad_values(checkpoints, tmp_path, capsys):
    from m2rnn.apps.options import parse_dtype

    assert parse_dtype("bf16") is parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("fp16") is parse_dtype("float16") is torch.float16 and parse_dtype("fp32") is torch.float32
    assert main(heal_args(checkpoints, tmp_path / "out", "--swap-layers", "1", "--dtype", "int8")) == 1
    assert "--dtype: dtype 'int8' is not supported; choose one of: float32, fp32" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_shows_every_default_and_cpu_defaults_are_small():
    from m2rnn.apps.cli import build_parser
    from m2rnn.apps.heal.healing import DEVICE_DEFAULTS

    parser = build_parser()
    heal_parser = parser._subparsers._group_actions[0].choices["heal"]
    for action in heal_parser._actions:
        if action.option_strings and action.nargs != 0 and action.dest not in {"student", "swap_layers", "dataset",
                                                                                "text_files"}:
            assert "default" in (action.help or ""), action.option_strings
    cpu = HealSettings.for_device("cpu")
    assert (cpu.stage1_steps, cpu.stage2_steps, cpu.batch_size) == tuple(
        DEVICE_DEFAULTS["cpu"][k] for k in ("stage1_steps", "stage2_steps", "batch_size"))
    assert HealSettings.for_device("cuda", stage1_steps=7).stage1_steps == 7
    assert HealSettings.for_device("cuda").stage2_steps == DEVICE_DEFAULTS["gpu"]["stage2_steps"]
    assert DEVICE_DEFAULTS["cpu"]["block_size"] * DEVICE_DEFAULTS["cpu"]["stage2_steps"] < 10_000  # minutes, not hours
