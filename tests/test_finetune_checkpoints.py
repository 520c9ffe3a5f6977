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
