"""`m2rnn demo`: the quick mode end to end (train, evaluate, report, save, reload, generate) and the CLI."""

from __future__ import annotations

import json

import torch

from m2rnn import cli, demo


def test_quick_demo_end_to_end(tmp_path, capsys):
    torch.set_num_threads(1)
    summary = demo.run_demo(tmp_path / "out", quick=True, progress=False)
    out = tmp_path / "out"
    assert (out / "s3_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "| M2RNN |" in (out / "results.md").read_text()
    payload = json.loads((out / "results.json").read_text())
    assert set(payload["results"]) == {"M2RNN", "Gated DeltaNet"}
    assert set(payload["results"]["M2RNN"]) == {"4", "8", "16", "32"}
    assert (out / "m2rnn-s3" / "config.json").exists() and (out / "m2rnn-s3" / "model.safetensors").exists()
    assert summary["reload_matches"]
    assert [row["length"] for row in summary["generation"]] == [8, 16, 32]
    assert "beyond the training length" in summary["verdict"]
    printed = capsys.readouterr().out
    assert "AutoModelForCausalLM" in printed and "model.generate" in printed


def test_reloaded_model_is_an_auto_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = demo.build_model(demo.m2rnn_config(quick=True), seed=0)
    reloaded = demo.save_and_reload(model, tmp_path / "m")
    assert isinstance(reloaded, AutoModelForCausalLM._model_mapping[type(model.config)])
    x = torch.randint(0, 6, (2, 7))
    torch.testing.assert_close(model(x).logits, reloaded(x).logits)


def test_shipped_checkpoints_load_and_run():
    assert demo.shipped_models_available(), "the demo checkpoints must ship inside the package (m2rnn/assets/demo)"
    models = demo.load_shipped_models()
    assert set(models) == {"m2rnn", "gdn"}
    for model, record in models.values():
        assert model(torch.randint(0, 6, (1, 5))).logits.shape == (1, 5, model.config.vocab_size)
        assert "recipe" in record


def test_cli_parses_demo_options(monkeypatch):
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda output_dir, **kw: seen.update(output_dir=output_dir, **kw))
    assert cli.main(["demo", "--output-dir", "x", "--train", "--steps", "7", "--seed", "3", "--no-progress"]) == 0
    assert seen["output_dir"] == "x" and seen["train"] and seen["steps"] == 7 and seen["seed"] == 3
    assert not seen["progress"] and not seen["quick"] and seen["train_seconds"] == 100.0
    assert cli.main([]) == 2
