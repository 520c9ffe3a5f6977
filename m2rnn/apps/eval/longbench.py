"""LongBench v1 with the original protocol: official prompts, middle truncation, per-task lengths and metrics.

Protocol (as LongBench's own prediction script): the formatted prompt is tokenized; if it is longer than the budget
`max_length`, its first `max_length // 2` and last `max_length // 2` tokens are kept (instructions sit at both
ends). Decoding is greedy with the task's `max_new_tokens`; samsum also stops at a newline. For trec, triviaqa,
samsum and lsht the prediction is cut to its first line. Each example scores the max over its references; a
task's score is the mean ×100 (2 decimals); the overall score is the mean over tasks.

Data: the official per-task JSONL files (`input`, `context`, `answers`, `all_classes`, `length`, ...), either from
a local folder (`<dir>/<task>.jsonl`, `<dir>/data/<task>.jsonl` or `<dir>/data.zip`) or from the Hub dataset
`THUDM/LongBench`'s `data.zip`.

Metrics are implemented here except ROUGE-L, which comes from the `rouge` package exactly as in the original
(a summary-level union-LCS F over "."-split sentences; in the `eval` extra); the code similarity is difflib's ratio ×100 rounded, as `fuzzywuzzy.fuzz.ratio` without python-Levenshtein.
Chinese metrics need `jieba` (`pip install jieba`).
"""

from __future__ import annotations

import difflib
import io
import json
import re
import string
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from .common import GenerateFn, markdown_table
from .longbench_prompts import (
    ALL_TASKS,
    FIRST_LINE_TASKS,
    MAX_NEW_TOKENS,
    METRIC_NAMES,
    NO_CHAT_TEMPLATE_TASKS,
    PAPER_TASKS,
    TASK_GROUPS,
    fill_prompt,
)

HUB_DATASET = "THUDM/LongBench"
HUB_ARCHIVE = "data.zip"

# ---------------------------------------------------------------------------------------------------- metrics

_CHINESE_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏．"


def _segment_chinese(text: str) -> list[str]:
    try:
        import jieba
    except ImportError:
        raise ImportError("the Chinese LongBench metrics need jieba: pip install jieba") from None
    return list(jieba.cut(text, cut_all=False))


def normalize_english(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_chinese(text: str) -> str:
    """Lowercase, drop Chinese and English punctuation, drop all whitespace."""
    punctuation = set(string.punctuation) | set(_CHINESE_PUNCTUATION)
    return "".join("".join(ch for ch in text.lower() if ch not in punctuation).split())


def token_f1(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1."""
    common = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(prediction_tokens)
    recall = common / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str, **_: Any) -> float:
    return token_f1(normalize_english(prediction).split(), normalize_english(reference).split())


def qa_f1_zh(prediction: str, reference: str, **_: Any) -> float:
    def tokens(text: str) -> list[str]:
        return [t for t in (normalize_chinese(w) for w in _segment_chinese(text)) if t]

    return token_f1(tokens(prediction), tokens(reference))


def rouge_l(prediction: str, reference: str, **_: Any) -> float:
    """ROUGE-L F from the `rouge` package, as the original LongBench scores it (0 when the package raises,
    e.g. on an empty prediction)."""
    try:
        from rouge import Rouge
    except ImportError:
        raise ImportError("the LongBench summarisation metric needs the rouge package: pip install 'm2rnn[eval]'") from None
    try:
        return Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
    except Exception:  # the original treats any failure (empty text, no words) as a score of 0
        return 0.0


def rouge_l_zh(prediction: str, reference: str, **_: Any) -> float:
    return rouge_l(" ".join(_segment_chinese(prediction)), " ".join(_segment_chinese(reference)))


def classification(prediction: str, reference: str, *, all_classes: Sequence[str] | None = None, **_: Any) -> float:
    """1/|matches| when the gold class is among the class names found in the prediction, else 0.

    Class names that are proper substrings of the gold label are not counted as matches.
    """
    if not all_classes:
        raise ValueError("classification needs the example's `all_classes`")
    matches = [c for c in all_classes if c in prediction]
    matches = [c for c in matches if not (c in reference and c != reference)]
    return 1.0 / len(matches) if reference in matches else 0.0


def _share_equal(numbers: Sequence[str], target: str) -> float:
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, reference: str, **_: Any) -> float:
    """Share of the integers in the prediction equal to the reference's paragraph number ("Paragraph N")."""
    found = re.findall(r"Paragraph (\d+)", reference)
    return _share_equal(re.findall(r"\d+", prediction), found[0]) if found else 0.0


def retrieval_zh(prediction: str, reference: str, **_: Any) -> float:
    """As `retrieval`, for references written "段落N"."""
    found = re.findall(r"段落(\d+)", reference)
    return _share_equal(re.findall(r"\d+", prediction), found[0]) if found else 0.0


def count(prediction: str, reference: str, **_: Any) -> float:
    """Share of the integers in the prediction equal to the reference count."""
    return _share_equal(re.findall(r"\d+", prediction), str(reference))


def fuzz_ratio(a: str, b: str) -> int:
    """difflib's similarity ratio ×100, rounded (fuzzywuzzy's `fuzz.ratio` in its pure-Python mode)."""
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim(prediction: str, reference: str, **_: Any) -> float:
    """Similarity of the first code line of the prediction (no backtick, `#` or `//`) to the reference."""
    lines = prediction.lstrip("\n").split("\n")
    line = next((l for l in lines if "`" not in l and "#" not in l and "//" not in l), "")
    return fuzz_ratio(line, reference) / 100


MetricFn = Callable[..., float]
METRICS: dict[str, MetricFn] = {
    "qa_f1": qa_f1, "qa_f1_zh": qa_f1_zh, "rouge": rouge_l, "rouge_zh": rouge_l_zh,
    "classification": classification, "retrieval": retrieval, "retrieval_zh": retrieval_zh,
    "count": count, "code_sim": code_sim,
}


def first_line(prediction: str) -> str:
    return prediction.lstrip("\n").split("\n")[0]


def score_example(task: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None) -> float:
    """The task's metric, max over the references (after the first-line cut for the few-shot tasks)."""
    if task in FIRST_LINE_TASKS:
        prediction = first_line(prediction)
    metric = METRICS[METRIC_NAMES[task]]
    return max((metric(prediction, ref, all_classes=all_classes) for ref in answers), default=0.0)


def score_task(task: str, predictions: Sequence[str], examples: Sequence[dict]) -> float:
    """Mean example score ×100, rounded to 2 decimals."""
    if not examples:
        return 0.0
    total = sum(score_example(task, p, e["answers"], e.get("all_classes")) for p, e in zip(predictions, examples))
    return round(100 * total / len(examples), 2)


# ---------------------------------------------------------------------------------------------------- tasks and data


def resolve_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """Task names from a comma list that may mix names and groups (`paper`, `all`, `en`, `zh`, categories)."""
    if spec is None:
        return list(PAPER_TASKS)
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    tasks: list[str] = []
    for item in filter(None, items):
        names = TASK_GROUPS.get(item, (item,))
        for name in names:
            if name not in ALL_TASKS:
                raise ValueError(
                    f"--tasks: unknown LongBench task {item!r}; tasks: {', '.join(ALL_TASKS)}; "
                    f"groups: {', '.join(TASK_GROUPS)}"
                )
            if name not in tasks:
                tasks.append(name)
    if not tasks:
        raise ValueError("--tasks: no task given")
    return tasks


def _parse_jsonl(text: str, source: str) -> list[dict]:
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        example = json.loads(line)
        missing = [k for k in ("input", "context", "answers") if k not in example]
        if missing:
            raise ValueError(f"{source} line {number}: missing field(s) {missing} of the LongBench JSONL format")
        examples.append(example)
    return examples


def _read_from_zip(archive: Path, task: str) -> list[dict]:
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.namelist() if m == f"{task}.jsonl" or m.endswith(f"/{task}.jsonl")]
        if not members:
            raise FileNotFoundError(f"{archive} has no {task}.jsonl")
        return _parse_jsonl(io.TextIOWrapper(zf.open(members[0]), encoding="utf-8").read(), f"{archive}:{members[0]}")


def load_examples(task: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """The task's examples, from `data_dir` when given, else from the Hub (`THUDM/LongBench`'s data.zip)."""
    if data_dir is not None:
        folder = Path(data_dir)
        for candidate in (folder / f"{task}.jsonl", folder / "data" / f"{task}.jsonl"):
            if candidate.is_file():
                examples = _parse_jsonl(candidate.read_text(encoding="utf-8"), str(candidate))
                break
        else:
            if not (folder / HUB_ARCHIVE).is_file():
                raise FileNotFoundError(f"--data-dir {str(folder)!r}: no {task}.jsonl, data/{task}.jsonl or data.zip")
            examples = _read_from_zip(folder / HUB_ARCHIVE, task)
    else:
        from huggingface_hub import hf_hub_download

        archive = hf_hub_download(HUB_DATASET, HUB_ARCHIVE, repo_type="dataset")
        examples = _read_from_zip(Path(archive), task)
    return examples[:limit] if limit is not None else examples


# ---------------------------------------------------------------------------------------------------- prompts


def keep_head_and_tail(ids: Sequence[int], max_length: int) -> list[int]:
    """`ids` unchanged when it fits, else its first and last `max_length // 2` ids."""
    if len(ids) <= max_length:
        return list(ids)
    half = max_length // 2
    return list(ids[:half]) + list(ids[len(ids) - half:])


def truncate_middle(prompt: str, tokenizer: Any, max_length: int) -> str:
    """The prompt cut in the middle to `max_length` tokens (special tokens not counted; `keep_head_and_tail`), as
    text: the head and the tail are decoded separately, as LongBench's reference code does."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_length:
        return prompt
    kept = keep_head_and_tail(ids, max_length)
    half = len(kept) // 2
    return tokenizer.decode(kept[:half], skip_special_tokens=True) + tokenizer.decode(kept[half:], skip_special_tokens=True)


def build_prompt(task: str, example: dict, tokenizer: Any, max_length: int, chat_template: bool = False) -> str:
    """Template, middle truncation, then (when asked and the task allows) the tokenizer's chat template."""
    prompt = truncate_middle(fill_prompt(task, example["context"], example["input"]), tokenizer, max_length)
    if chat_template and task not in NO_CHAT_TEMPLATE_TASKS:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


# ---------------------------------------------------------------------------------------------------- runner


def run_longbench(
    generate: GenerateFn,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    max_length: int,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    chat_template: bool = False,
    progress: bool = True,
    data: dict[str, list[dict]] | None = None,
) -> dict[str, Any]:
    """Generate and score every task; returns `{"tasks": {task: {...}}, "average": ..., "predictions": {...}}`.

    `data` ({task: examples}, as `load_examples` returns them) skips loading. Within a task, prompts are batched
    by length (longest first) and predictions put back in data order.
    """
    if max_length <= 0:
        raise ValueError(f"--max-length must be positive, got {max_length}")
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    if data is None:
        data = {task: load_examples(task, data_dir, limit) for task in tasks}
    bar = tqdm(total=sum(map(len, data.values())), desc="LongBench", disable=not progress, dynamic_ncols=True)
    task_results: dict[str, Any] = {}
    predictions: dict[str, list[dict]] = {}
    for task, examples in data.items():
        bar.set_postfix(task=task)
        prompts = [build_prompt(task, e, tokenizer, max_length, chat_template) for e in examples]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        outputs: list[str] = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            completions = generate([prompts[i] for i in chunk], MAX_NEW_TOKENS[task], task == "samsum")
            for i, completion in zip(chunk, completions):
                outputs[i] = completion
            bar.update(len(chunk))
        task_results[task] = {
            "score": score_task(task, outputs, examples),
            "metric": METRIC_NAMES[task],
            "num_examples": len(examples),
            "max_new_tokens": MAX_NEW_TOKENS[task],
        }
        predictions[task] = [
            {"pred": p, "answers": e["answers"], "all_classes": e.get("all_classes"), "length": e.get("length"),
             "_id": e.get("_id")}
            for p, e in zip(outputs, examples)
        ]
    bar.close()
    scores = [r["score"] for r in task_results.values()]
    average = round(sum(scores) / len(scores), 2) if scores else 0.0
    return {"tasks": task_results, "average": average, "max_length": max_length, "predictions": predictions}


def plan(model: Any, tokenizer: Any, data: dict[str, list[dict]], max_length: int, where: str) -> str:
    """What a run will do (tasks, examples, tokens) and a rough time estimate from timing the model once.

    Prompt tokens are estimated from each task's first example (characters per token), capped at `max_length`.
    """
    from ..options import format_duration
    from .common import seconds_per_token

    prompt_tokens = new_tokens = 0
    for task, examples in data.items():
        if not examples:
            continue
        sample = fill_prompt(task, examples[0]["context"], examples[0]["input"])
        chars_per_token = len(sample) / max(1, len(tokenizer(sample, add_special_tokens=False)["input_ids"]))
        prompt_tokens += sum(min(max_length, round(len(e["context"]) / chars_per_token)) for e in examples)
        new_tokens += MAX_NEW_TOKENS[task] * len(examples)
    per_prompt_token, per_new_token = seconds_per_token(model)
    estimate = prompt_tokens * per_prompt_token + new_tokens * per_new_token
    count = sum(map(len, data.values()))
    return (
        f"{len(data)} tasks, {count} examples, prompt budget {max_length} tokens: ~{prompt_tokens / 1e6:.2f}M prompt "
        f"tokens, up to {new_tokens} new tokens on {where}; estimated ~{format_duration(estimate)} (rough, from one "
        "timed prompt; --limit and --max-length change the size)"
    )


def results_markdown(results: dict[str, Any], title: str = "LongBench v1") -> str:
    """Per-task table (score ×100, metric, examples) and the average."""
    rows = [(task, r["score"], r["metric"], r["num_examples"]) for task, r in results["tasks"].items()]
    rows.append(("**average**", results["average"], "", sum(r["num_examples"] for r in results["tasks"].values())))
    return f"# {title}\n\n" + markdown_table(["task", "score", "metric", "examples"], rows) + (
        f"\n\nPrompt budget: {results['max_length']} tokens (middle truncation); greedy decoding; scores ×100.\n"
    )


def write_predictions(folder: Path, predictions: dict[str, list[dict]]) -> None:
    """`predictions/<task>.jsonl` in the original's output format."""
    target = folder / "predictions"
    target.mkdir(exist_ok=True)
    for task, rows in predictions.items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (target / f"{task}.jsonl").write_text(text, encoding="utf-8")


def write_evaluation(
    folder: Path, model_name: str, tasks: Sequence[str], *, tokenizer: str | None = None,
    data_dir: str | None = None, limit: int | None = None, max_length: int | None = None, batch_size: int = 1,
    chat_template: bool = False, progress: bool = True, offline_hint: str = "", device: str | None = None,
    dtype: str | None = None, trust_remote_code: bool = False,
) -> str:
    """`m2rnn eval longbench`: load the data (before the weights), the model and its tokenizer, run `tasks` with a
    prompt budget of `max_length` tokens (default: the model's context window minus 500), and write predictions,
    results.json and results.md into `folder`; returns the markdown table."""
    from .common import (
        HFGenerator,
        announce,
        context_window,
        environment,
        hub_access,
        load_model_and_tokenizer,
        write_results,
    )
    from .distributed import data_parallel, global_batch_size

    with hub_access(needed=data_dir is None, what="THUDM/LongBench's data.zip", hint=offline_hint):
        data = {task: load_examples(task, data_dir, limit) for task in tasks}
    model, loaded_tokenizer = load_model_and_tokenizer(model_name, tokenizer=tokenizer, device=device, dtype=dtype,
                                                       trust_remote_code=trust_remote_code)
    if max_length is None:
        window = context_window(model)
        if window is None or window <= 500:
            raise ValueError(f"--max-length: the model declares no usable context window ({window}); pass one")
        max_length = window - 500
    announce("longbench", plan(model, loaded_tokenizer, data, max_length, next(model.parameters()).device.type))
    results = run_longbench(
        data_parallel(HFGenerator(model, loaded_tokenizer), batch_size), loaded_tokenizer, tasks, max_length=max_length,
        data=data, batch_size=global_batch_size(batch_size), chat_template=chat_template, progress=progress,
    )
    write_predictions(folder, results.pop("predictions"))
    results.update(model=model_name, **environment())
    markdown = results_markdown(results, f"LongBench v1: {model_name}")
    write_results(folder, results, markdown)
    return markdown
