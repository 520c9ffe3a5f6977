"""Needle-in-a-haystack: prompt lengths and depths as requested, an oracle finds every needle, silence finds none."""

import json
import re

import pytest
import torch

from m2rnn import M2RNNConfig, M2RNNForCausalLM
from m2rnn.apps.eval import niah
from m2rnn.tokenization import byte_level_tokenizer
from m2rnn.apps.options import parse_float_list, parse_int_list

NEEDLE = re.compile(r"One of the special magic \w+ for ([\w-]+) is: ([\w-]+)\.")
QUESTION = re.compile(r"(?:What is|What are all) the special magic \w+ for (.+?) mentioned in the provided text\?")


def oracle(prompts, max_new_tokens, stop_at_newline):
    """Copies the values of the needles whose keys the question asks for."""
    outputs = []
    for prompt in prompts:
        asked = re.split(r", | and ", QUESTION.search(prompt).group(1))
        outputs.append(" " + ", ".join(value for key, value in NEEDLE.findall(prompt) if key in asked) + ".")
    return outputs


def silent(prompts, max_new_tokens, stop_at_newline):
    return ["" for _ in prompts]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer(padding_side="left")


@pytest.mark.parametrize("task", niah.TASKS)
def test_prompts_fill_the_length_and_place_the_needle_at_depth(tokenizer, task):
    spec = niah.SPECS[task]
    depths = [0.0, 0.5, 1.0]
    examples = niah.build_examples(tokenizer, task, 1536, depths, samples=2, seed=3)
    assert [(e.depth, e.sample) for e in examples] == [(d, s) for s in range(2) for d in depths]
    budget = 1536 - spec.max_new_tokens
    for e in examples:
        assert e.length == 1536
        assert e.prompt_tokens == len(tokenizer(e.prompt)["input_ids"])
        assert 0.85 * budget <= e.prompt_tokens <= budget
        found = NEEDLE.findall(e.prompt)
        assert len(found) == spec.num_keys * spec.values_per_key
        assert len(e.expected) == spec.asked_keys * spec.values_per_key
        assert set(e.expected) <= {value for _, value in found}
    # the first asked needle moves from the start to the end of the haystack with the depth
    first = [examples[i].prompt.find(examples[i].expected[0]) / len(examples[i].prompt) for i in range(3)]
    assert first[0] < 0.2 and 0.3 < first[1] < 0.7 and first[2] > 0.75
    # same sample, same needles across depths; another sample draws new ones
    assert examples[0].expected == examples[1].expected != examples[3].expected


def test_oracle_finds_every_needle_and_silence_none(tokenizer):
    lengths, depths = [1024, 2048], [0.0, 0.5, 1.0]
    found = niah.run_niah(oracle, tokenizer, lengths=lengths, depths=depths, samples=1, batch_size=2, progress=False)
    missed = niah.run_niah(silent, tokenizer, lengths=lengths, depths=depths, samples=1, progress=False)
    assert found["lengths"] == lengths and found["depths"] == depths and found["tasks"] == list(niah.TASKS)
    assert len(found["cells"]) == len(niah.TASKS) * len(lengths) * len(depths)
    assert all(cell["score"] == 100.0 and cell["samples"] == 1 for cell in found["cells"])
    assert found["by_length"] == {1024: 100.0, 2048: 100.0}
    assert all(cell["score"] == 0.0 for cell in missed["cells"])
    markdown = niah.results_markdown(found)
    assert "| **mean** | 100.00 | 100.00 |" in markdown and "| 0.5 | 100.00 | 100.00 |" in markdown


def test_partial_answers_score_the_share_found():
    assert niah.score_prediction("1234567 and 7654321", ["1234567", "7654321", "1111111", "2222222"]) == 0.5
    assert niah.score_prediction("", ["1234567"]) == 0.0


def test_length_and_depth_options():
    assert parse_int_list("1K,2k, 4096", "--lengths") == [1024, 2048, 4096]
    with pytest.raises(ValueError, match="--lengths: 'lots' is not an integer"):
        parse_int_list("1024,lots", "--lengths")
    assert parse_float_list("0,0.5,1", "--depths") == [0.0, 0.5, 1.0]


def test_too_short_length_is_named(tokenizer):
    with pytest.raises(ValueError, match="--lengths: 200 tokens is too short"):
        niah.build_examples(tokenizer, "multiquery", 200, [0.5], 1)


def test_niah_command_with_a_tiny_model(tmp_path, capsys):
    from m2rnn.apps.cli import main

    torch.manual_seed(0)
    config = M2RNNConfig.from_preset("tiny", vocab_size=260, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    M2RNNForCausalLM(config).save_pretrained(tmp_path / "model")
    byte_level_tokenizer(padding_side="left").save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    argv = ["eval", "niah", str(tmp_path / "model"), "--tasks", "single_1", "--lengths", "512,768",
            "--depths", "0,1", "--limit", "1", "--batch-size", "4", "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["lengths"] == [512, 768] and results["depths"] == [0.0, 1.0]
    assert all(e["prompt_tokens"] <= e["length"] for e in results["examples"])
    assert (out / "niah_heatmap.png").stat().st_size > 0
    assert "| single_1 |" in (out / "results.md").read_text()
    assert main([*argv[:3], "--depths", "0,2", "--output-dir", str(tmp_path / "other")]) == 1
    assert "--depths: 2.0 is outside" in capsys.readouterr().err


def test_s3_command_shares_the_eval_group(tmp_path):
    """`m2rnn eval s3` (wiring only; the engine is tested in test_s3.py): table, plot and JSON by length."""
    from m2rnn.apps.cli import main

    torch.manual_seed(0)
    M2RNNForCausalLM(M2RNNConfig.from_preset("tiny")).save_pretrained(tmp_path / "s3-model")
    out = tmp_path / "s3"
    argv = ["eval", "s3", str(tmp_path / "s3-model"), "--lengths", "4,8", "--limit", "8", "--train-length", "4",
            "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    by_length = results["results"]["s3-model"]
    assert set(by_length) == {"4", "8"} and all(0 <= r["accuracy"] <= 1 for r in by_length.values())
    assert results["num_samples"] == 8
    assert (out / "s3_accuracy.png").stat().st_size > 0
    assert "4 (train)" in (out / "results.md").read_text()
