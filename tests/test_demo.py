"""`m2rnn demo`: the quick mode end to end, the shipped checkpoints' accuracy, and the CLI (output safety included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2rnn.apps import cli, demo, s3_models
from m2rnn.apps.eval import s3
from m2rnn.apps.output import OUTPUT_MARKER

ROOT = Path(__file__).resolve().parents[1]


def test_quick_demo_end_to_end(tmp_path, capsys):
    torch.set_num_threads(1)
    summary = demo.run_demo(tmp_path / "out", quick=True, progress=False)
    out = tmp_path / "out"
    assert (out / "s3_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "| M2RNN |" in (out / "results.md").read_text()
    payload = json.loads((out / "results.json").read_text())
    assert set(payload["results"]) == {demo.MODEL_NAMES[key] for key in demo.MODEL_NAMES}
    assert set(payload["results"]["M2RNN"]) == {"4", "8", "16", "32"}
    assert "sequence_accuracy" in payload["results"]["M2RNN"]["32"]
    assert (out / "m2rnn-s3" / "config.json").exists() and (out / "m2rnn-s3" / "model.safetensors").exists()
    assert (out / OUTPUT_MARKER).exists()  # written through staged_output
    assert summary["reload_matches"]
    assert [row["length"] for row in summary["generation"]] == [8, 32]
    assert "Cumulative sequence accuracy at length 32" in summary["verdict"]
    printed = capsys.readouterr().out
    assert "AutoModelForCausalLM" in printed and "model.generate" in printed


def test_reloaded_model_is_an_auto_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = s3_models.build_model(s3_models.m2rnn_config(quick=True), seed=0)
    reloaded = demo.save_and_reload(model, tmp_path / "m")
    assert isinstance(reloaded, AutoModelForCausalLM._model_mapping[type(model.config)])
    x = torch.randint(0, 6, (2, 7))
    torch.testing.assert_close(model(x).logits, reloaded(x).logits)


def test_shipped_checkpoints_are_the_recipe_models():
    assert demo.shipped_models_available(), "the demo checkpoints must ship inside the package (m2rnn/assets/demo)"
    models = demo.load_shipped_models()
    assert set(models) == set(demo.MODEL_NAMES)
    for key, (model, record) in models.items():
        assert model(torch.randint(0, 6, (1, 5))).logits.shape == (1, 5, 8)
        assert record["train_length"] == 128 and record["reached_length"] == 128
        assert sum(p.numel() for p in model.parameters()) < 400_000
    m2rnn = models["m2rnn"][0].config
    assert (m2rnn.m2rnn_state_weight_init, m2rnn.m2rnn_use_forget_gate, m2rnn.m2rnn_conv_init) == (
        "orthogonal", False, "identity")
    harness = models["harness_gdn"][0].model.layers
    assert len(harness) == 1 and harness[0].mixer.conv1d is None and harness[0].mixer.A_log is None


@pytest.mark.slow
def test_shipped_models_reach_their_stated_accuracy_on_cpu():
    """docs/demo.md: M2RNN ≥ 99% cumulative sequence accuracy at 512 (4x its training length), the one-layer
    GDN [-1,1] below 1% from length 32 (200 sequences here, 1,000 in the demo)."""
    torch.set_num_threads(1)
    models = demo.load_shipped_models()
    m2rnn = s3.evaluate_s3_prefixes(models["m2rnn"][0], [128, 512], num_samples=200, seed=10_001, batch_size=100)
    assert m2rnn[512]["sequence_accuracy"] >= 0.99, m2rnn
    harness = s3.evaluate_s3_prefixes(models["harness_gdn"][0], [8, 32], num_samples=200, seed=10_001)
    assert harness[32]["sequence_accuracy"] < 0.01 and harness[8]["sequence_accuracy"] < 0.9, harness


def _m2rnn(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    m2rnn = Path(sys.executable).with_name("m2rnn")
    return subprocess.run([str(m2rnn), *args], env=env, capture_output=True, text=True, timeout=600)


def test_demo_refuses_to_replace_an_output_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / OUTPUT_MARKER).write_text("{}")  # an earlier demo's folder
    (out / "results.md").write_text("earlier results")
    refused = _m2rnn("demo", "--quick", "--output-dir", str(out))
    assert refused.returncode == 1
    assert "m2rnn demo: error: --output-dir" in refused.stderr and "--overwrite" in refused.stderr
    assert (out / "results.md").read_text() == "earlier results"

    done = _m2rnn("demo", "--quick", "--threads", "1", "--output-dir", str(out), "--overwrite")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| M2RNN |" in (out / "results.md").read_text() and (out / "m2rnn-s3" / "config.json").exists()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    refused = _m2rnn("demo", "--quick", "--output-dir", str(foreign), "--overwrite")
    assert refused.returncode == 1 and "not written by m2rnn" in refused.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_cli_parses_demo_options(monkeypatch):
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda output_dir, **kw: seen.update(output_dir=output_dir, **kw))
    assert cli.main(["demo", "--output-dir", "x", "--train", "--steps", "7", "--seed", "3", "--no-progress",
                     "--eval-samples", "50", "--overwrite"]) == 0
    assert seen["output_dir"] == "x" and seen["train"] and seen["steps"] == 7 and seen["seed"] == 3
    assert not seen["progress"] and not seen["quick"] and seen["train_seconds"] == 100.0
    assert seen["eval_samples"] == 50 and seen["overwrite"]
    assert cli.main(["demo"]) == 0 and seen["seed"] == 1 and not seen["overwrite"] and seen["eval_samples"] is None
    assert cli.main([]) == 2
