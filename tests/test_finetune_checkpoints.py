"""`examples/finetune.py` checkpoints: `--save-every` writes staged step-N folders, `--resume-from` continues with
the losses and weights of a run that never stopped, `--consolidate` turns a checkpoint into a Hub folder."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from m2rnn.apps.output import OUTPUT_MARKER, OutputError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"
COMMON = ["--cpu", "--max-steps", "4", "--batch-size", "2", "--max-length", "32", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def finetune():
    spec = importlib.util.spec_from_file_location("finetune_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_save_every_resume_and_consolidate(finetune, tmp_path):
    checkpoints = tmp_path / "ckpt"
    full = finetune.main(COMMON + ["--save-every", "2", "--checkpoint-dir", str(checkpoints),
                                   "--output-dir", str(tmp_path / "full")])
    assert sorted(p.name for p in checkpoints.iterdir()) == [OUTPUT_MARKER, "step-2", "step-4"]
    assert not list(checkpoints.glob(".step-*"))  # staging folders renamed into place
    resumed = finetune.main(COMMON + ["--resume-from", str(checkpoints / "step-2"),
                                      "--output-dir", str(tmp_path / "resumed")])
    assert resumed["first_step"] == 2
    assert resumed["losses"] == full["losses"][2:]
    finetune.main(["--consolidate", str(checkpoints / "step-4"), "--output-dir", str(tmp_path / "hub")])
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    for folder in ("resumed", "hub"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / folder).state_dict()
        assert all(torch.equal(loaded[name], value) for name, value in trained.items()), folder
    assert (tmp_path / "hub" / "tokenizer.json").is_file() and (tmp_path / "hub" / "modeling_m2rnn.py").is_file()


def test_checkpoint_dir_of_someone_else_is_refused(finetune, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="--checkpoint-dir"):
        finetune.main(COMMON + ["--save-every", "2", "--checkpoint-dir", str(foreign), "--no-save"])
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("layout", [[], ["--no-packing"]])
def test_rows_rounded_up_train_the_same_and_count_only_real_tokens(finetune, tmp_path, layout):
    """The default `--pad-to-multiple-of 256` trains as exact-length rows do (`1`), and its throughput counts
    only the documents' tokens."""
    options = COMMON + ["--max-steps", "3", "--no-save"] + layout
    rounded = finetune.main(options)
    exact = finetune.main(options + ["--pad-to-multiple-of", "1"])
    torch.testing.assert_close(torch.tensor(rounded["losses"]), torch.tensor(exact["losses"]), rtol=1e-5, atol=1e-6)
    assert rounded["timed_tokens"] == exact["timed_tokens"] > 0


def test_pad_to_multiple_of_must_be_positive(finetune, capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args(["--pad-to-multiple-of", "0"])
    assert "--pad-to-multiple-of must be >= 1, got 0" in capsys.readouterr().err
