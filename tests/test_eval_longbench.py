"""LongBench v1: metrics against hand-computed values, middle truncation, the runner and the CLI on a fixture."""

import json
import re

import pytest
import torch

from m2rnn import M2RNNConfig, M2RNNForCausalLM
from m2rnn.apps.eval import longbench as lb
from m2rnn.apps.eval.common import HFGenerator
from m2rnn.tokenization import byte_level_tokenizer
from m2rnn.apps.eval.longbench_prompts import ALL_TASKS, MAX_NEW_TOKENS, METRIC_NAMES, PROMPTS, fill_prompt

# ---------------------------------------------------------------------------------------------------- metrics


def test_task_tables_cover_the_21_tasks():
    assert len(ALL_TASKS) == 21 and set(PROMPTS) == set(MAX_NEW_TOKENS) == set(METRIC_NAMES) == set(ALL_TASKS)
    assert lb.resolve_tasks(None) == ["gov_report", "qmsum", "multi_news", "trec", "triviaqa", "samsum", "lcc",
                                      "repobench-p"]
    assert lb.resolve_tasks("code,lcc,trec") == ["lcc", "repobench-p", "trec"]
    with pytest.raises(ValueError, match="--tasks: unknown LongBench task 'nope'"):
        lb.resolve_tasks("nope")


def test_fill_prompt_leaves_braces_in_the_context_alone():
    prompt = fill_prompt("repobench-p", "def f(): return {input}\n", "x = {")
    assert prompt == "Please complete the code given below. \ndef f(): return {input}\nx = {Next line of code:\n"


def test_qa_f1():
    assert lb.qa_f1("The Big cat!", "big  cat") == 1.0  # case, punctuation, articles, spaces
    assert lb.qa_f1("a red car", "the blue car") == pytest.approx(0.5)  # 1 common of 2 and 2
    assert lb.qa_f1("red red car", "red car car") == pytest.approx(2 / 3)  # bag counts: 2 common of 3 and 3
    assert lb.qa_f1("", "car") == 0.0


def test_rouge_l():
    # one sentence, distinct words: LCS "a c" = 2; precision 2/3, recall 2/4 -> F1 = 4/7
    assert lb.rouge_l("a x c", "a b c d") == pytest.approx(4 / 7, abs=1e-6)
    # the original's summary-level ROUGE-L (rouge 1.0.1) is not plain LCS F1 once words repeat or sentences split
    assert lb.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-6)
    assert lb.rouge_l("w1 w2 w6 w7 w8. w1 w3 w8 w9 w5", "w1 w2 w3 w4 w5") == pytest.approx(8 / 13, abs=1e-6)
    assert lb.rouge_l("", "a b") == 0.0


def test_classification():
    classes = ["DESC", "ENTY", "HUM", "Expression abbreviated", "abbreviated"]
    assert lb.classification("ENTY", "ENTY", all_classes=classes) == 1.0
    assert lb.classification("DESC or ENTY", "ENTY", all_classes=classes) == 0.5
    assert lb.classification("HUM", "ENTY", all_classes=classes) == 0.0
    # "abbreviated" is a proper substring of the gold label: not counted as a second match
    assert lb.classification("Expression abbreviated", "Expression abbreviated", all_classes=classes) == 1.0


def test_retrieval_and_count():
    assert lb.retrieval("Paragraph 3", "Paragraph 3") == 1.0
    assert lb.retrieval("Paragraph 3, not 4", "Paragraph 3") == 0.5
    assert lb.retrieval("no idea", "Paragraph 3") == 0.0
    assert lb.retrieval_zh("段落7", "段落7") == 1.0
    assert lb.count("There are 12 unique paragraphs, 12.", "12") == 1.0
    assert lb.count("12 or 13", 12) == 0.5


def test_code_sim():
    assert lb.fuzz_ratio("abcd", "abce") == 75  # 2 * 3 / 8
    # leading newlines and comment lines are skipped; "x = foo(1)" vs "x = foo(2)": 2 * 9 / 20
    assert lb.code_sim("\n// note\n# note\nx = foo(1)\nmore", "x = foo(2)") == pytest.approx(0.9)


def test_chinese_metrics_need_jieba_or_work():
    try:
        import jieba  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install jieba"):
            lb.qa_f1_zh("北京", "北京")
    else:
        assert lb.qa_f1_zh("北京。", "北京") == 1.0


def test_scoring_first_line_and_max_over_answers():
    assert lb.score_example("trec", "\n\nENTY\nDESC", ["ENTY"], ["DESC", "ENTY"]) == 1.0
    assert lb.score_example("triviaqa", "Paris\nLondon", ["London", "Paris"], None) == 1.0
    examples = [{"answers": ["a b"]}, {"answers": ["c"]}, {"answers": ["d e"]}]
    assert lb.score_task("hotpotqa", ["a b", "x", "d"], examples) == pytest.approx(round(100 * (1 + 0 + 2 / 3) / 3, 2))


# ---------------------------------------------------------------------------------------------------- truncation


def test_truncation_keeps_head_and_tail():
    assert lb.keep_head_and_tail(list(range(10)), 4) == [0, 1, 8, 9]
    assert lb.keep_head_and_tail([1, 2], 4) == [1, 2]
    tokenizer = byte_level_tokenizer(padding_side="left")  # one token per byte
    prompt = "HEAD" + "x" * 100 + "TAIL"
    assert lb.truncate_middle(prompt, tokenizer, 8) == "HEADTAIL"
    assert lb.truncate_middle(prompt, tokenizer, 1000) == prompt
    example = {"context": "word " * 400, "input": "Which type is this?"}
    built = lb.build_prompt("trec", example, tokenizer, 200)
    assert built.startswith("Please determine the type") and built.endswith("Which type is this?")
    assert len(tokenizer(built, add_special_tokens=False)["input_ids"]) == 200


# ---------------------------------------------------------------------------------------------------- runner


def _fixture(folder):
    """Official-format JSONL for three tasks; each context ends with the answer a fake model will echo."""
    rows = {
        "trec": [("ENTY", "ENTY"), ("HUM", "DESC")],  # (echoed, gold)
        "passage_count": [("4", "4"), ("5", "5")],
        "gov_report": [("the report says hello", "the report says hello world")],
    }
    for task, pairs in rows.items():
        lines = []
        for i, (echo, gold) in enumerate(pairs):
            lines.append(json.dumps({
                "input": f"Question {i}", "context": "filler text " * 60 + f"ECHO[{echo}]", "answers": [gold],
                "length": 120, "dataset": task, "language": "en",
                "all_classes": ["ENTY", "DESC", "HUM"] if task == "trec" else None, "_id": f"{task}-{i}",
            }))
        (folder / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_runner_scores_a_fixture(tmp_path):
    calls = []

    def echo(prompts, max_new_tokens, stop_at_newline):
        calls.append((len(prompts), max_new_tokens, stop_at_newline))
        return ["\n" + re.findall(r"ECHO\[(.*?)\]", p)[-1] + "\nextra" for p in prompts]

    tokenizer = byte_level_tokenizer(padding_side="left")
    results = lb.run_longbench(echo, tokenizer, ["trec", "passage_count", "gov_report"], max_length=600,
                               data_dir=_fixture(tmp_path), batch_size=2, progress=False)
    scores = {task: r["score"] for task, r in results["tasks"].items()}
    rouge = 100 * lb.rouge_l("the report says hello\nextra", "the report says hello world")
    assert scores == {"trec": 50.0, "passage_count": 100.0, "gov_report": round(rouge, 2)}
    assert results["average"] == round((50 + 100 + round(rouge, 2)) / 3, 2)
    assert calls == [(2, 64, False), (2, 32, False), (1, 512, False)]
    assert results["predictions"]["trec"][1]["answers"] == ["DESC"]
    table = lb.results_markdown(results)
    assert "| trec | 50.00 | classification | 2 |" in table and "**average**" in table


def test_missing_data_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        lb.load_examples("qmsum", tmp_path)
    (tmp_path / "qmsum.jsonl").write_text(json.dumps({"context": "c", "answers": ["a"]}) + "\n")
    with pytest.raises(ValueError, match=r"missing field\(s\) \['input'\]"):
        lb.load_examples("qmsum", tmp_path)


def _tiny_model_dir(folder):
    torch.manual_seed(0)
    config = M2RNNConfig.from_preset("tiny", vocab_size=260, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     max_position_embeddings=800)
    M2RNNForCausalLM(config).save_pretrained(folder)
    byte_level_tokenizer(padding_side="left").save_pretrained(folder)
    return folder


def test_hf_generator_batches_left_padded_prompts():
    torch.manual_seed(0)
    config = M2RNNConfig.from_preset("tiny", vocab_size=260, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = M2RNNForCausalLM(config).eval()
    generate = HFGenerator(model, byte_level_tokenizer(padding_side="left"))
    batched = generate(["short", "a much longer prompt"], 6)
    single = [generate([p], 6)[0] for p in ["short", "a much longer prompt"]]
    assert batched == single


def test_longbench_command(tmp_path, capsys):
    from m2rnn.apps.cli import main

    model_dir = _tiny_model_dir(tmp_path / "model")
    out = tmp_path / "out"
    (tmp_path / "data").mkdir()
    argv = ["eval", "longbench", str(model_dir), "--tasks", "trec,passage_count", "--data-dir",
            str(_fixture(tmp_path / "data")), "--output-dir", str(out), "--batch-size", "2", "--limit", "1",
            "--no-progress"]
    assert main(argv) == 0
    assert "m2rnn eval longbench: 2 tasks, 2 examples, prompt budget 300 tokens" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"trec", "passage_count"}
    assert results["max_length"] == 300  # context window 800 minus 500
    assert all(r["num_examples"] == 1 for r in results["tasks"].values())
    assert (out / "predictions" / "trec.jsonl").is_file()
    assert "passage_count" in (out / "results.md").read_text()
    assert main(argv) == 1 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--max-length", "100"]) == 0
    assert json.loads((out / "results.json").read_text())["max_length"] == 100
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # temp folders cleaned up
