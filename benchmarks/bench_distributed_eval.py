"""The data-parallel evaluation phases of `bench_distributed.py`: their model folder, local lm-eval tasks, and the
comparison of a one-process run with a two-process one.

lm-eval 0.4.13 splits data only when it sees more than one GPU under `accelerate launch`: each task's documents
go to the ranks by stride (rank r takes documents r, r + 2, ...), each rank batches and sorts its own requests, and
rank 0 gathers the per-document samples and metrics. So per-request log-likelihoods come from other batches than in
one process; in float32 they agree to rounding, and the metrics should be equal. `m2rnn eval niah` splits every
batch of prompts across the ranks in the groups one process forms, so its results must be equal exactly.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

CHOICE_TASK, GENERATE_TASK = "m2rnn_bench_choice", "m2rnn_bench_generate"

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{question}}}}"
{target}
metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
CHOICE_TARGET = 'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"'
GENERATE_TARGET = """\
doc_to_target: "{{choices[answer]}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false"""

# Words of unequal lengths, so that the documents' token counts differ and lm-eval's length-sorted batches mix them.
WORDS = ("apple", "river", "stone", "blue", "mountain", "a", "quiet", "lamp", "seventeen", "cloud", "of", "tin")


def arithmetic_docs(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """`count` documents `{"question", "choices", "answer"}`: "<words> a + b =" with three numeric choices."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        prefix = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12)))
        choices = [str(a + b), str(a + b + rng.randint(1, 9)), str(abs(a - b))]
        rng.shuffle(choices)
        question = f"{prefix} {a} + {b} =".strip()
        docs.append({"question": question, "choices": choices, "answer": choices.index(str(a + b))})
    return docs


def write_tasks(folder: Path, choice_docs: int, generate_docs: int) -> list[str]:
    """A multiple-choice and a generate_until task (YAML over JSONL, absolute paths) in `folder`; their names."""
    folder.mkdir(parents=True, exist_ok=True)
    tasks = []
    for task, count, output_type, target, metric in (
        (CHOICE_TASK, choice_docs, "multiple_choice", CHOICE_TARGET, "acc"),
        (GENERATE_TASK, generate_docs, "generate_until", GENERATE_TARGET, "exact_match"),
    ):
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in arithmetic_docs(count, seed=len(tasks))))
        (folder / f"{task}.yaml").write_text(TASK_YAML.format(task=task, data=data.resolve(), output_type=output_type,
                                                             target=target, metric=metric))
        tasks.append(task)
    return tasks


def prepare_model(folder: Path, preset: str) -> str:
    """`folder` ready for lm-eval and `m2rnn eval`: `M2RNNConfig.from_preset(preset)` from seed 0 saved there unless
    a model is there already (the consolidated FSDP2 checkpoint), plus the byte-level tokenizer when it has none."""
    import torch

    from m2rnn import M2RNNConfig, M2RNNForCausalLM
    from m2rnn.tokenization import byte_level_tokenizer

    done = []
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        M2RNNForCausalLM(M2RNNConfig.from_preset(preset)).save_pretrained(folder)
        done.append(f"saved {preset} (seed 0)")
    if not (folder / "tokenizer_config.json").is_file():
        byte_level_tokenizer().save_pretrained(folder)
        done.append("added the byte-level tokenizer")
    return f"{folder}: {', '.join(done) or 'used as it is'}"


# ---------------------------------------------------------------------------------------------------- reading runs


def read_lm_eval_cli(folder: Path) -> dict[str, Any]:
    """What `lm_eval ... --log_samples --output_path FOLDER` wrote last: `{"results", "samples"}`.

    lm-eval writes `MODEL_NAME/results_DATE.json` and `samples_TASK_DATE.jsonl` (from rank 0 alone), DATE an ISO time.
    """
    results_files = sorted(folder.rglob("results_*.json"), key=lambda path: path.name)
    if not results_files:
        raise FileNotFoundError(f"no results_*.json under {folder}")
    latest = results_files[-1]
    date = latest.stem.removeprefix("results_")
    samples: dict[str, list[dict[str, Any]]] = {}
    for path in latest.parent.glob(f"samples_*_{date}.jsonl"):
        task = path.name.removeprefix("samples_").removesuffix(f"_{date}.jsonl")
        samples[task] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {"results": json.loads(latest.read_text())["results"], "samples": samples}


def read_m2rnn_lm_eval(folder: Path) -> dict[str, Any]:
    """What `m2rnn eval lm-eval ... --log-samples --output-dir FOLDER` wrote, in `read_lm_eval_cli`'s form."""
    results = json.loads((folder / "results.json").read_text())
    return {"results": results["results"], "samples": results.get("samples", {})}


def loglikelihood_requests(log: str) -> int | None:
    """The most log-likelihood requests one process ran, from lm-eval's progress bars in a run's output (shown by
    rank 0 only): under a data-parallel split about half of a one-process run's count, without one the same."""
    totals = [int(total) for total in re.findall(r"Running loglikelihood requests:[^\r\n]*? \d+/(\d+) ", log)]
    return max(totals, default=None)


# ---------------------------------------------------------------------------------------------------- comparing


def _loglikelihoods(response: Any) -> list[float] | None:
    """The log-likelihoods of a sample's `filtered_resps` when it holds (log-likelihood, is_greedy) pairs (as
    strings in lm-eval's sample files); None for generated text."""
    if isinstance(response, list) and response and all(isinstance(x, list) and len(x) == 2 for x in response):
        return [float(loglikelihood) for loglikelihood, _ in response]
    return None


def _responses(samples: dict[str, list[dict[str, Any]]]) -> dict[tuple[str, int], Any]:
    return {(task, sample["doc_id"]): sample["filtered_resps"] for task, rows in samples.items() for sample in rows}


def compare_lm_eval(one: dict[str, Any], two: dict[str, Any]) -> dict[str, Any]:
    """A one-process and a data-parallel lm-eval run (`read_*` forms): metrics equal, the largest metric difference,
    the largest per-document log-likelihood difference (documents matched by task and doc_id), generations equal."""
    metric_diffs = []
    for task, metrics in one["results"].items():
        for key, value in metrics.items():
            other = two["results"].get(task, {}).get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metric_diffs.append(abs(value - other) if isinstance(other, (int, float)) else float("inf"))
            elif value != other:
                metric_diffs.append(float("inf"))
    first, second = _responses(one["samples"]), _responses(two["samples"])
    loglikelihood_diffs, generations, generations_equal = [], 0, 0
    for key, response in first.items():
        if key not in second:
            continue
        numbers, other = _loglikelihoods(response), _loglikelihoods(second[key])
        if numbers is None or other is None:
            generations += 1
            generations_equal += response == second[key]
        elif len(numbers) == len(other):
            loglikelihood_diffs += [abs(a - b) for a, b in zip(numbers, other)]
        else:
            loglikelihood_diffs.append(float("inf"))
    docs = {task: len(rows) for task, rows in one["samples"].items()}
    return {
        "metrics_equal": one["results"] == two["results"],
        "metrics_max_abs_diff": max(metric_diffs, default=0.0),
        "docs": docs,
        "docs_matched": len(first.keys() & second.keys()),
        "docs_only_in_one_run": len(first.keys() ^ second.keys()),
        "loglikelihood_max_abs_diff": max(loglikelihood_diffs, default=None),
        "loglikelihoods_compared": len(loglikelihood_diffs),
        "generations_equal": f"{generations_equal}/{generations}",
    }


def compare_results_files(one: Path, two: Path, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """Two `results.json` files of an `m2rnn eval` command: which top-level fields are equal and which differ."""
    first, second = (json.loads(path.read_text()) for path in (one, two))
    keys = sorted((first.keys() | second.keys()) - set(ignore))
    differ = [key for key in keys if first.get(key) != second.get(key)]
    return {"equal": not differ, "fields_compared": keys, "fields_different": differ,
            "examples": len(first.get("examples", []))}
