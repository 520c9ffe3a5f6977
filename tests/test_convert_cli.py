"""`m2rnn convert` as users run it: the installed entry point with default flags (progress bars on), output safety
(nothing the user gave is lost, killed runs leave nothing behind), provenance, and one clear line for every bad input.

Subprocess tests run the `m2rnn` console script with this checkout first on PYTHONPATH; the many bad-input cases run
in-process through `m2rnn.apps.cli.main` (the same code, without a new interpreter per case).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import m2rnn  # noqa: F401  (registers the Auto classes)
from m2rnn.apps.cli import main
from m2rnn.apps.conversion import ConversionError, convert_checkpoint
from m2rnn.apps.options import parse_dtype
from m2rnn.apps.output import OUTPUT_MARKER

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINT = shutil.which("m2rnn", path=str(Path(sys.executable).parent)) or "m2rnn"


def tiny_source(folder: Path) -> Path:
    """A tiny Qwen3.5 GDN hybrid (3 GDN layers + 1 attention layer), sharded, with a tokenizer side file."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    config = Qwen3_5TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, layer_types=["linear_attention"] * 3 + ["full_attention"],
        linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Qwen3_5ForCausalLM(config).save_pretrained(folder, max_shard_size="40KB")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return tiny_source(tmp_path_factory.mktemp("models") / "src")


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Hidden staging folders (`.NAME.*.partial` / `.old`) anywhere below `folder`."""
    return sorted(str(p) for p in folder.rglob(".*") if p.name.endswith((".partial", ".old")))


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "M2RNN_TRACEBACK"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra.pop("PYTHONPATH", ""), str(REPO), env.get("PYTHONPATH")]))
    return {**env, **extra}


def m2rnn_convert(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`m2rnn convert ARGS` through the installed entry point, default flags unless given."""
    return subprocess.run([ENTRY_POINT, "convert", *map(str, args)], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if "Warning" not in line and not line.startswith("  ")]
    assert len(lines) == 1 and lines[0].startswith("m2rnn convert: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------------------------
# The default path, through the entry point
# ---------------------------------------------------------------------------------------------------------------
def test_default_flags_convert_with_progress_and_provenance(source, tmp_path):
    """Progress bars on (the default crashed: `next()` on the tqdm object); the config says where it came from."""
    before = digest(source)
    out = tmp_path / "converted"
    result = m2rnn_convert(source, out, "--swap-layers", "0,2", "--init", "transplant", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert "Converting tensors" in result.stderr and "100%" in result.stderr
    assert f"wrote {out}" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["conversion"] == {
        "source": str(source), "source_model_type": "qwen3_5_text", "swapped_layers": [0, 2],
        "init": "transplant (the GDN layer's projections, conv, decay gate and norm reused; W = I)",
    }
    assert config["dtype"] == "bfloat16" and (out / OUTPUT_MARKER).is_file() and (out / "tokenizer_config.json").is_file()
    assert digest(source) == before and not leftovers(tmp_path) and not leftovers(source.parent)

    from transformers import AutoConfig

    from m2rnn.model_card import render_model_card

    card = str(render_model_card(AutoConfig.from_pretrained(out)))
    assert f"Converted from** `{source}`" in card and "(a local checkpoint)" in card  # a path, not a Hub link
    assert "qwen3_5_text" in card and "Swapped layers" in card


def test_no_progress_silences_every_bar(source, tmp_path):
    """`--no-progress` hides ours and transformers' own bars (--verify loads the source with `from_pretrained`)."""
    result = m2rnn_convert(source, tmp_path / "out", "--verify", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "max |logit difference|" in result.stdout
    assert "%|" not in result.stderr and "it/s" not in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Output safety, through the entry point
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cwd, src, output, message",
    [
        (".", "models/src", "models", "contains the input 'models/src'"),
        ("models", "src", ".", "OUT '.' is, or contains, the working folder"),
        (".", "models/src", "models/src/out", "is, or lies inside, the input 'models/src'"),
    ],
    ids=["src_inside_out", "dot", "out_inside_src"],
)
def test_overwrite_never_replaces_the_source(tmp_path, cwd, src, output, message):
    """`convert models/src models --overwrite` used to delete models/src and its siblings and exit 0."""
    models = tmp_path / "models"
    tiny_source(models / "src")
    (models / "sibling.txt").write_text("keep me")
    before = digest(models)
    result = m2rnn_convert(src, output, "--overwrite", cwd=tmp_path / cwd)
    assert_one_line_error(result, message)
    assert digest(models) == before and not leftovers(tmp_path)


def _start_paused_convert(source: Path, out: Path, hooks: Path, ready: Path) -> subprocess.Popen:
    """Start `m2rnn convert SOURCE OUT` and return once every weight is written into its staging folder.

    A `sitecustomize` module on PYTHONPATH makes `shutil.copy2` into a `.partial` folder (copying the tokenizer
    files, the last step before the rename) signal `ready` and sleep, so the test can kill the real process there.
    """
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(
        "import os, shutil, time\n"
        "_copy2 = shutil.copy2\n"
        "def copy2(src, dst, *args, **kwargs):\n"
        "    if '.partial' in str(dst):\n"
        f"        open({str(ready)!r}, 'w').close()\n"
        "        time.sleep(300)\n"
        "    return _copy2(src, dst, *args, **kwargs)\n"
        "shutil.copy2 = copy2\n"
    )
    process = subprocess.Popen([ENTRY_POINT, "convert", str(source), str(out), "--overwrite"],
                               env=cli_env(PYTHONPATH=str(hooks)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 240
    while not ready.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "convert never reached its last step"
        time.sleep(0.1)
    return process


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_convert_leaves_no_partial_folder(source, tmp_path, kill):
    """SIGTERM: the staging folder is removed at once. SIGKILL: it stays until the next run, which removes it.
    Either way the existing output (ours, being replaced with --overwrite) is untouched."""
    out = tmp_path / "out"
    convert_checkpoint(source, out, progress=False)
    old = digest(out)
    process = _start_paused_convert(source, out, tmp_path / "hooks", tmp_path / "ready")
    assert len(leftovers(tmp_path)) == 1  # hundreds of MB on a real model
    process.send_signal(kill)
    process.communicate(timeout=60)
    assert digest(out) == old
    if kill == signal.SIGTERM:
        assert process.returncode == 143 and not leftovers(tmp_path)
        return
    assert process.returncode == -signal.SIGKILL and len(leftovers(tmp_path)) == 1
    result = m2rnn_convert(source, out, "--overwrite", "--swap-layers", "1")
    assert result.returncode == 0, result.stderr
    assert "left by an interrupted run" in result.stderr
    assert not leftovers(tmp_path) and json.loads((out / "config.json").read_text())["mixer_types"][1] == "m2rnn"


def test_a_bad_input_is_one_line_through_the_entry_point(tmp_path):
    """A damaged weights file: one line naming the file, exit 1, no output and no partial folder."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3_5_text"}))
    (src / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    result = m2rnn_convert(src, tmp_path / "out")
    assert_one_line_error(result, str(src / "model.safetensors"), "not a readable safetensors file")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs, in-process through the CLI's main
# ---------------------------------------------------------------------------------------------------------------
def copy_of(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


def run_main(capsys, *args: str | Path) -> tuple[int, str]:
    """`m2rnn convert ARGS` in-process: (exit code, stderr); usage errors exit through SystemExit."""
    try:
        code = main(["convert", *map(str, args)])
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


def _truncated(source: Path, tmp_path: Path) -> tuple[Path, str]:
    src = copy_of(source, tmp_path / "truncated")
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return src, shard.name


def _garbage(source: Path, tmp_path: Path) -> tuple[Path, str]:
    src = copy_of(source, tmp_path / "garbage")
    (src / "model-00002-of-00006.safetensors").write_bytes(b"PK\x03\x04 a zip, not safetensors")
    return src, "model-00002-of-00006.safetensors"


def _index_without_weight_map(source: Path, tmp_path: Path) -> tuple[Path, str]:
    src = copy_of(source, tmp_path / "noindex")
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1}}))
    return src, "no `weight_map`"


def _index_not_json(source: Path, tmp_path: Path) -> tuple[Path, str]:
    src = copy_of(source, tmp_path / "badindex")
    (src / "model.safetensors.index.json").write_text("{'weight_map': ")
    return src, "model.safetensors.index.json: not readable as JSON"


def _config_list(source: Path, tmp_path: Path) -> tuple[Path, str]:
    src = copy_of(source, tmp_path / "listconfig")
    (src / "config.json").write_text("[1, 2]")
    return src, "config.json: expected a JSON object of config keys, got a list"


def _config_not_json(source: Path, tmp_path: Path) -> tuple[Path, str]:
    src = copy_of(source, tmp_path / "textconfig")
    (src / "config.json").write_text("model_type = qwen3_5")
    return src, "config.json: not readable as JSON"


def _config_without_model_type(source: Path, tmp_path: Path) -> tuple[Path, str]:
    src = copy_of(source, tmp_path / "notype")
    config = json.loads((src / "config.json").read_text())
    del config["model_type"]
    (src / "config.json").write_text(json.dumps(config))
    return src, "config.json has no `model_type`"


def _config_value_of_wrong_kind(source: Path, tmp_path: Path) -> tuple[Path, str]:
    src = copy_of(source, tmp_path / "wrongkind")
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = "four"
    (src / "config.json").write_text(json.dumps(config))
    return src, "not a valid 'qwen3_5_text' config"


def _config_not_matching_weights(source: Path, tmp_path: Path) -> tuple[Path, str]:
    src = copy_of(source, tmp_path / "vocab")
    config = json.loads((src / "config.json").read_text())
    config["vocab_size"] = 10
    (src / "config.json").write_text(json.dumps(config))
    return src, "has shape (64, 32), but the config implies (10, 32); config.json does not match the weights"


def _shard_outside(source: Path, tmp_path: Path) -> tuple[Path, str]:
    src = copy_of(source, tmp_path / "dotdot" / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shutil.move(src / "model-00001-of-00006.safetensors", src.parent / "outside.safetensors")
    index["weight_map"] = {k: "../outside.safetensors" if v.startswith("model-00001") else v
                           for k, v in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return src, "shard '../outside.safetensors' leads outside the source folder"


def _shard_absolute(source: Path, tmp_path: Path) -> tuple[Path, str]:
    src = copy_of(source, tmp_path / "absolute")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.move(src / "model-00003-of-00006.safetensors", elsewhere)
    index["weight_map"] = {k: str(elsewhere) if v.startswith("model-00003") else v for k, v in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return src, "leads outside the source folder"


def _shard_symlinked_outside(source: Path, tmp_path: Path) -> tuple[Path, str]:
    src = copy_of(source, tmp_path / "symlinked")
    shard = src / "model-00004-of-00006.safetensors"
    shutil.move(shard, tmp_path / "elsewhere4.safetensors")
    shard.symlink_to(tmp_path / "elsewhere4.safetensors")
    return src, "shard 'model-00004-of-00006.safetensors' leads outside the source folder"


def _tokenizer_symlinked_outside(source: Path, tmp_path: Path) -> tuple[Path, str]:
    src = copy_of(source, tmp_path / "tokenizer_link")
    (tmp_path / "secret.txt").write_text("not a tokenizer")
    (src / "tokenizer.json").symlink_to(tmp_path / "secret.txt")
    return src, "file 'tokenizer.json' leads outside the source folder"


def _single_file_symlinked_outside(source: Path, tmp_path: Path) -> tuple[Path, str]:
    src = tmp_path / "single_link"
    src.mkdir()
    shutil.copy(source / "config.json", src)
    save_file({"x": torch.zeros(1)}, tmp_path / "outside.safetensors")
    (src / "model.safetensors").symlink_to(tmp_path / "outside.safetensors")
    return src, "weights file 'model.safetensors' leads outside the source folder"


def _only_pickled(source: Path, tmp_path: Path) -> tuple[Path, str]:
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(source / "config.json", src)
    (src / "pytorch_model.bin").write_bytes(b"")
    return src, "only pickled weights (pytorch_model.bin)"


def _already_m2rnn(source: Path, tmp_path: Path) -> tuple[Path, str]:
    src = tmp_path / "converted"
    convert_checkpoint(source, src, progress=False)
    return src, "already an M2RNN-family checkpoint"


def _quantized_config(source: Path, tmp_path: Path) -> tuple[Path, str]:
    src = copy_of(source, tmp_path / "fp8")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (src / "config.json").write_text(json.dumps(config))
    return src, "quantized checkpoint (quantization_config, quant_method='fp8')"


def _integer_weights(source: Path, tmp_path: Path) -> tuple[Path, str]:
    src = copy_of(source, tmp_path / "int8")
    shard = src / "model-00006-of-00006.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, shard)
    return src, f"tensor {name!r} is stored as torch.int8; quantized weights are not converted"


BAD_SOURCES = [_already_m2rnn, _quantized_config, _integer_weights, _truncated, _garbage, _index_without_weight_map,
               _index_not_json, _config_list, _config_not_json,
               _config_without_model_type, _config_value_of_wrong_kind, _config_not_matching_weights, _shard_outside, _shard_absolute,
               _shard_symlinked_outside, _tokenizer_symlinked_outside, _single_file_symlinked_outside, _only_pickled]


@pytest.mark.parametrize("make", BAD_SOURCES, ids=[f.__name__.strip("_") for f in BAD_SOURCES])
def test_bad_source_is_one_clear_line(source, tmp_path, capsys, make):
    src, fragment = make(source, tmp_path)
    code, err = run_main(capsys, src, tmp_path / "out")
    assert code == 1 and err.startswith("m2rnn convert: error: ") and len(err.strip().splitlines()) == 1, err
    assert fragment in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize(
    "args, code, fragment",
    [
        (["{missing}", "{out}"], 1, "checkpoint folder '{missing}' does not exist"),
        (["Qwen/Qwen3.5-0.8B", "{out}"], 1, "hf download Qwen/Qwen3.5-0.8B --local-dir DIR"),
        (["{src}/config.json", "{out}"], 1, "is a file; pass the folder that holds config.json"),
        (["{empty}", "{out}"], 1, "has no config.json"),
        (["{src}", "{out}", "--max-shard-size", "nan"], 2, "--max-shard-size: 'nan' must be a positive, finite"),
        (["{src}", "{out}", "--max-shard-size", "inf"], 2, "--max-shard-size: 'inf' must be a positive, finite"),
        (["{src}", "{out}", "--max-shard-size", "0"], 2, "--max-shard-size: '0' must be a positive, finite"),
        (["{src}", "{out}", "--max-shard-size", "-1"], 2, "--max-shard-size: '-1' must be a positive, finite"),
        (["{src}", "{out}", "--dtype", "int8"], 2, "dtype 'int8' is not supported; choose one of: float32, fp32"),
        (["{src}", "{out}", "--swap-layers", "0;2"], 2, "--swap-layers: '0;2' is not an integer; expected comma-separated layer indices"),
        (["{src}", "{out}", "--swap-layers", "9"], 1, "layer 9 is outside 0..3"),
        (["{src}", "{out}", "--swap-layers", "-1"], 1, "layer -1 is outside 0..3"),
        (["{src}", "{out}", "--swap-layers", "1,1"], 1, "repeats a layer"),
        (["{src}", "{out}", "--swap-layers", "3"], 1, "layer 3 is 'full_attention'"),
        (["{src}", "{out}", "--source-id", "not a repo"], 1, "source_id='not a repo' is not a Hub repo id"),
        (["{src}", "{out}", "--init", "transplant"], 1, "--init transplant sets up swapped layers: give --swap-layers"),
        (["{src}", "{file}/out"], 1, "is a file, not a folder"),
        (["{src}", "{file}", "--overwrite"], 1, "exists and is not a folder"),
        (["{src}", "{theirs}", "--overwrite"], 1, "was not written by m2rnn"),
        (["{src}", "{ours}"], 1, "already exists; pass --overwrite"),
    ],
    ids=["missing", "hub_id", "file", "no_config", "nan", "inf", "zero", "negative", "dtype", "layers_syntax",
         "layer_range", "layer_negative", "layer_repeat", "attention_layer", "source_id", "init_without_swap", "out_below_file", "out_is_file",
         "out_not_ours", "out_exists"],
)
def test_bad_arguments_are_one_clear_line(source, tmp_path, capsys, args, code, fragment):
    names = {"src": source, "out": tmp_path / "out", "missing": tmp_path / "missing", "empty": tmp_path / "empty",
             "file": tmp_path / "file.txt", "theirs": tmp_path / "theirs", "ours": tmp_path / "ours"}
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("a file")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep me")
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / OUTPUT_MARKER).write_text("{}")
    before = digest(tmp_path)
    exit_code, err = run_main(capsys, *(arg.format(**names) for arg in args))
    assert exit_code == code, err
    assert fragment.format(**names) in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("m2rnn convert: error: ")
    assert digest(tmp_path) == before and not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_verify_fla_without_a_gpu_says_what_is_needed(tmp_path, capsys, monkeypatch):
    """fla's own model needs a GPU: refused before any work, saying what is needed and how to go on."""
    src = tmp_path / "fla"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gated_deltanet"}))
    save_file({"x": torch.zeros(1)}, src / "model.safetensors")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = run_main(capsys, src, tmp_path / "out", "--verify")
    assert code == 1 and f"--verify for {src}: " in err and "fla's model needs a GPU" in err, err
    assert "convert without --verify" in err and not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_hf_cache_snapshot_links_are_allowed_and_name_the_repo(source, tmp_path):
    """A Hub cache snapshot links its files into the repository's blobs/; provenance records the repo id."""
    repo = tmp_path / "hub" / "models--Org--Tiny-GDN"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in source.iterdir():
        shutil.copy(file, blobs / file.name)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", file.name))
    result = convert_checkpoint(snapshot, tmp_path / "out", progress=False)
    assert result.config.conversion["source"] == "Org/Tiny-GDN"
    assert "tokenizer_config.json" in result.side_files


@pytest.mark.parametrize("spellings", [("bf16", "bfloat16", "BF16"), ("fp16", "float16", "half"),
                                       ("fp32", "float32", "float")])
def test_parse_dtype_accepts_both_spellings(spellings):
    assert len({parse_dtype(name) for name in spellings}) == 1
    assert parse_dtype(spellings[0]) in (torch.bfloat16, torch.float16, torch.float32)


def test_parse_dtype_names_the_value_and_choices():
    with pytest.raises(ValueError, match=r"dtype 'int8' is not supported; choose one of: .*bfloat16, bf16"):
        parse_dtype("int8")


def test_source_id_is_recorded(source, tmp_path, capsys):
    assert run_main(capsys, source, tmp_path / "out", "--source-id", "Qwen/Qwen3.5-0.8B", "--no-progress")[0] == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["conversion"]["source"] == "Qwen/Qwen3.5-0.8B"


def test_both_dtype_spellings_and_python_api_checks(source, tmp_path):
    for name in ("bf16", "bfloat16"):
        result = convert_checkpoint(source, tmp_path / name, dtype=name, progress=False)
        assert result.config.dtype == torch.bfloat16
    with pytest.raises(ConversionError, match="max_shard_size=nan"):
        convert_checkpoint(source, tmp_path / "nan", max_shard_size=float("nan"))
    with pytest.raises(ConversionError, match="init='warm' must be one of"):
        convert_checkpoint(source, tmp_path / "warm", swap_layers=[0], init="warm")
    assert not (tmp_path / "nan").exists() and not (tmp_path / "warm").exists()


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--source-id", "--swap-layers", "--init", "--dtype", "--verify", "--overwrite", "--max-shard-size", "--seed",
                   "--no-progress"):
        described = text.split(option)[-1]
        assert "(default: " in described.split(" --")[0], option
    assert "(default: fresh)" in text and "bfloat16, bf16" in text
