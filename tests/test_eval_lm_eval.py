"""`m2rnn eval lm-eval` end to end: a tiny saved model, two local tasks (YAML over generated JSONL), offline."""

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from m2rnn import M2RNNConfig, M2RNNForCausalLM  # noqa: E402
from m2rnn.apps.cli import main  # noqa: E402
from m2rnn.tokenization import byte_level_tokenizer  # noqa: E402

MC_TASK = """\
task: m2rnn_toy_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GEN_TASK = """\
task: m2rnn_toy_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    torch.manual_seed(0)
    model = M2RNNForCausalLM(M2RNNConfig.from_preset("tiny", vocab_size=260, pad_token_id=0, bos_token_id=1,
                                                     eos_token_id=2))
    model.save_pretrained(root / "model")
    byte_level_tokenizer(padding_side="left").save_pretrained(root / "model")
    docs = [
        {"question": "2 + 2 =", "choices": [" 4", " 5"], "answer": 0},
        {"question": "The sky is", "choices": [" green", " blue"], "answer": 1},
        {"question": "Cats say", "choices": [" meow", " moo", " woof"], "answer": 0},
    ]
    data = root / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "choice.yaml").write_text(MC_TASK.format(data=data))
    (tasks / "generate.yaml").write_text(GEN_TASK.format(data=data))
    return root


def test_lm_eval_command_writes_results(setup, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = setup / "out"
    argv = ["eval", "lm-eval", str(setup / "model"), "--tasks", "m2rnn_toy_choice,m2rnn_toy_generate",
            "--include-path", str(setup / "tasks"), "--output-dir", str(out), "--batch-size", "2", "--device", "cpu"]
    assert main(argv) == 0
    assert "m2rnn eval lm-eval: 2 task(s), 6 examples on cpu" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    acc = results["results"]["m2rnn_toy_choice"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert "exact_match,none" in results["results"]["m2rnn_toy_generate"]
    table = (out / "results.md").read_text()
    assert "m2rnn_toy_choice" in table and "m2rnn_toy_generate" in table

    assert results["m2rnn"]["tasks"] == ["m2rnn_toy_choice", "m2rnn_toy_generate"]

    assert main(argv) == 1 and "already exists; pass --overwrite" in capsys.readouterr().err

