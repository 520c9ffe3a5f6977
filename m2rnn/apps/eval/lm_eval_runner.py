"""lm-eval (EleutherAI lm-evaluation-harness 0.4.13) on our models and any transformers causal LM.

`m2rnn` is imported before lm-eval loads the model, so the `m2rnn` model type is registered with the Auto classes
and a local checkpoint loads without `trust_remote_code`. lm-eval's HF backend does the rest: log-likelihoods
from one forward pass over right-padded batches, generation through `model.generate` with left-padded batches
and our recurrent cache.

Plain lm-eval works too when the checkpoint carries `auto_map` (code on the Hub) or through
`python -c "import m2rnn, sys; from lm_eval.__main__ import cli_evaluate; sys.exit(cli_evaluate())" ...`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..options import parse_dtype
from .common import announce, environment, hub_access, load_checked_tokenizer, resolve_device


def _require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise ImportError(
            "`m2rnn eval lm-eval` needs lm-eval: pip install \"m2rnn[eval]\" (or pip install lm_eval==0.4.13)"
        ) from None
    return lm_eval


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """A comma list (or list) of lm-eval task or group names; the error names `--tasks`."""
    tasks = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else [t.strip() for t in spec]
    tasks = [t for t in tasks if t]
    if not tasks:
        raise ValueError("--tasks: give at least one lm-eval task, e.g. --tasks lambada_openai,hellaswag")
    return tasks


def run_lm_eval(
    model: str,
    tasks: str | Sequence[str],
    *,
    tokenizer: str | None = None,
    batch_size: int | str = 1,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    max_length: int | None = None,
    trust_remote_code: bool = False,
    apply_chat_template: bool = False,
    log_samples: bool = False,
    seed: int = 0,
    offline_hint: str = "pass local task YAMLs with include_path",
) -> dict[str, Any]:
    """Run `lm_eval.simple_evaluate` with the HF backend on `model` (a local folder or Hub id).

    Returns lm-eval's results dict (`results`, `groups`, `versions`, `n-shot`, `higher_is_better`, `config`,
    and `samples` when `log_samples`). `include_path` adds a folder of task YAMLs (local datasets, offline runs);
    `tokenizer` replaces the model's own. The tokenizer and the tasks' data are loaded before the model, so a
    missing tokenizer or an unreachable dataset fails at once (one quick try, then `offline_hint`).
    """
    import m2rnn  # noqa: F401  (registers the m2rnn model type before lm-eval calls AutoModelForCausalLM)

    lm_eval = _require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_names = parse_tasks(tasks)
    task_manager = TaskManager(include_path=include_path)
    unknown = [t for t in task_names if not task_manager.match_tasks([t])]
    if unknown:
        where = f" (with --include-path {include_path})" if include_path else ""
        raise ValueError(f"--tasks: lm-eval does not know {', '.join(unknown)}{where}")
    loaded_tokenizer = load_checked_tokenizer(model, tokenizer, trust_remote_code)
    with hub_access(needed=True, what=f"the data of lm-eval task(s) {', '.join(task_names)}", hint=offline_hint):
        loaded = [task_manager.load([name]) for name in task_names]
        leaves = {task_name: task for item in loaded for task_name, task in item["tasks"].items()}
        announce("lm-eval", f"{len(leaves)} task(s), {_count_examples(leaves.values(), limit)} examples on "
                 f"{resolve_device(device).type}")
        lm = HFLM(
            pretrained=model, tokenizer=loaded_tokenizer, backend="causal", batch_size=batch_size,
            device=str(resolve_device(device)), dtype=parse_dtype(dtype, "--dtype", auto=True), max_length=max_length,
            trust_remote_code=trust_remote_code,
        )
        results = lm_eval.simple_evaluate(
            model=lm, tasks=[obj for item, name in zip(loaded, task_names) for obj in _top_level(item, name)],
            num_fewshot=num_fewshot, limit=limit,
            task_manager=task_manager, log_samples=log_samples, apply_chat_template=apply_chat_template,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    if results is None:  # non-zero ranks in distributed runs
        return {}
    results = dict(results)
    results["m2rnn"] = {"model": model, "tokenizer": tokenizer or model, "tasks": task_names, "limit": limit,
                        **environment()}
    return results


def _top_level(loaded: dict[str, Any], name: str) -> list[Any]:
    """What `TaskManager.load([name])` built for `name` as objects `simple_evaluate` accepts: the group, or the
    task (or a tag's tasks)."""
    if name in loaded["groups"]:
        return [loaded["groups"][name]]
    return list(loaded["tasks"].values())


def _count_examples(tasks: Iterable[Any], limit: int | float | None) -> int:
    """Examples lm-eval will score: each task's evaluation documents, cut by `limit` (a count or a share)."""
    total = 0
    for task in tasks:
        size = len(task.eval_docs)
        total += size if limit is None else min(size, int(limit) if limit >= 1 else math.ceil(limit * size))
    return total


def results_markdown(results: dict[str, Any], title: str = "lm-eval") -> str:
    """lm-eval's own markdown tables (tasks, then groups when any)."""
    from lm_eval.utils import make_table

    text = f"# {title}: {results.get('m2rnn', {}).get('model', '')}\n\n" + make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def write_evaluation(folder: Path, model: str, tasks: str | Sequence[str], **kwargs: Any) -> str:
    """`m2rnn eval lm-eval`: `run_lm_eval(model, tasks, **kwargs)`, its results written into `folder`
    (results.json, results.md); returns the markdown table."""
    from .common import write_results

    results = run_lm_eval(model, tasks, **kwargs)
    if not results:  # a process other than rank 0 under a launcher: lm-eval gathers on rank 0
        return ""
    markdown = results_markdown(results)
    write_results(folder, results, markdown)
    return markdown
