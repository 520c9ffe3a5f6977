"""Publishing checkpoints to the Hugging Face Hub: `save_for_hub`, folder checks and `push`, and the `card` and
`push` commands.

The folder format itself (flat trust_remote_code code, `auto_map`, model card) is written by the library
(`m2rnn.remote_code`, called by every `save_pretrained`). `push_to_hub` / `m2rnn push` check a folder
(`check_folder`) before creating the repo and uploading it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m2rnn.remote_code import (
    AUTO_MAP,
    DEFAULT_MAX_SHARD_SIZE,
    OPTIONAL_PACKAGES,
    PACKAGE,
    guarded_nodes,
    is_available_everywhere,
    top_packages,
    add_auto_map,
    atomic_write_text,
    write_code,
)

from .output import OUTPUT_MARKER, PARTIAL_MARKER, staged_output

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class FolderCheckError(ValueError):
    """A folder is not a loadable M2RNN checkpoint; the message names the file and the problem."""


def save_for_hub(
    model: PreTrainedModel,
    folder: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    results: dict[str, Any] | None = None,
    conversion: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a complete Hub folder for `model`: weights, config with `auto_map`, flat code, generation config,
    tokenizer, and a model card (with `results` / `conversion` metadata when given, see `m2rnn.model_card`).

    Everything is written to a temporary sibling folder and renamed into place, so a failure leaves `folder` as it
    was. An existing `folder` is replaced only with `overwrite=True`, and only when m2rnn wrote it
    (`m2rnn.apps.output.staged_output`).
    """
    from m2rnn.model_card import write_model_card

    folder = Path(folder)
    with staged_output(folder, overwrite=overwrite, option="folder") as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        write_code(staging)  # our save_pretrained has written them already; cheap, and sure for any PreTrainedModel
        add_auto_map(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / "README.md").unlink(missing_ok=True)  # the card save_pretrained wrote, without results/conversion
        write_model_card(staging, config=model.config, results=results, conversion=conversion, model_name=folder.name,
                         overwrite_user_card=True)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Checking a folder before it is published
# ---------------------------------------------------------------------------------------------------------------
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_folder(folder: str | os.PathLike, *, load: bool = False) -> None:
    """Raise `FolderCheckError` listing every reason the checkpoint in `folder` would not load.

    Checks the config (parses, validates, `auto_map` points at files that exist), the flat code (only sibling
    imports of files present, no unguarded import of a package a trust_remote_code user may lack: the rules
    transformers applies), and the weights (safetensors only; the index's shards exist; every tensor's name and
    shape matches the model the config describes, read from the file headers without loading the data).
    `load=True` also loads the folder with `trust_remote_code=True` in a Python process that cannot see the m2rnn
    package and runs a forward pass (`load_without_package`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FolderCheckError(f"{folder}: not a folder")
    problems = _check_config(folder)
    problems += _check_code(folder)
    if not problems:
        problems += _check_weights(folder)
    if problems:
        raise FolderCheckError(f"{folder} is not a loadable M2RNN checkpoint:\n- " + "\n- ".join(problems))
    if load:
        try:
            load_without_package(folder, [[1, 2, 3]])
        except RuntimeError as error:
            raise FolderCheckError(f"{folder} does not load without the m2rnn package:\n{error}") from error


def _check_config(folder: Path) -> list[str]:
    path = folder / "config.json"
    if not path.is_file():
        return [f"{path}: missing"]
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        return [f"{path}: not valid JSON ({error})"]
    problems = []
    if config.get("model_type") != "m2rnn":
        problems.append(f"{path}: `model_type`={config.get('model_type')!r}, expected 'm2rnn'")
    auto_map = config.get("auto_map") or {}
    missing = [auto_class for auto_class in AUTO_MAP if auto_class not in auto_map]
    if missing:
        problems.append(
            f"{path}: `auto_map` lacks {missing} (save the model with m2rnn's save_pretrained, or add the code and "
            "auto_map with m2rnn.remote_code.write_hub_files(folder))"
        )
    for auto_class, reference in auto_map.items():
        if auto_class in AUTO_MAP and "--" not in reference and not (folder / f"{reference.rsplit('.', 1)[0]}.py").is_file():
            problems.append(f"{path}: `auto_map.{auto_class}`={reference!r} names a file that is not in the folder")
    if not problems:
        from m2rnn.configuration_m2rnn import M2RNNConfig

        try:
            M2RNNConfig.from_pretrained(folder)
        except (ValueError, TypeError) as error:
            problems.append(f"{path}: {error}")
    return problems


def _check_code(folder: Path) -> list[str]:
    """transformers' trust_remote_code rules, applied to every .py file of the folder."""
    problems = []
    for path in sorted(folder.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as error:
            problems.append(f"{path.name}: does not parse ({error})")
            continue
        guarded = guarded_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                target = folder / f"{node.module}.py"
                if node.level != 1 or node.module is None or "." in node.module or not target.is_file():
                    problems.append(f"{path.name}:{node.lineno}: `{ast.unparse(node)}` is not a sibling file of the folder")
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in guarded:
                missing = [p for p in top_packages(node) if not is_available_everywhere(p)]
                if missing:
                    problems.append(f"{path.name}:{node.lineno}: imports {missing} outside `try`; loading fails without them")
    return problems


def _weight_files(folder: Path) -> tuple[dict[str, str], list[str]]:
    """`{tensor name: shard file}` from the index or the single file, and problems found on the way."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            return {}, [f"{index_path.name}: not a safetensors index ({error!r})"]
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        return weight_map, [f"{index_path.name}: shard {name} is missing" for name in missing]
    if (folder / "model.safetensors").is_file():
        return {}, []
    return {}, ["no model.safetensors or model.safetensors.index.json"]


def _check_weights(folder: Path) -> list[str]:
    from safetensors import safe_open

    from m2rnn.configuration_m2rnn import M2RNNConfig
    from m2rnn.meta import expected_tensors
    from m2rnn.modeling_m2rnn import M2RNNForCausalLM

    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        return [f"pickled weights {pickles}: publish safetensors only (they run code when loaded)"]
    weight_map, problems = _weight_files(folder)
    if problems:
        return problems
    shards = sorted(set(weight_map.values())) or ["model.safetensors"]
    found: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        try:
            with safe_open(folder / shard, framework="pt") as f:
                for key in f.keys():
                    found[key] = tuple(f.get_slice(key).get_shape())
                    if weight_map and weight_map.get(key) != shard:
                        problems.append(f"{shard}: holds {key!r}, which the index puts in {weight_map.get(key)!r}")
        except Exception as error:  # safetensors raises its own error types for damaged files
            problems.append(f"{shard}: not a readable safetensors file ({error})")
    if problems:
        return problems
    config = M2RNNConfig.from_pretrained(folder)
    expected = expected_tensors(config, keep_tied=True)
    tied = set(M2RNNForCausalLM._tied_weights_keys) if config.tie_word_embeddings else set()
    for key in sorted(set(expected) - set(found) - tied):
        problems.append(f"weights: {key!r} {expected[key]} is missing")
    for key in sorted(set(found) - set(expected)):
        problems.append(f"weights: unexpected tensor {key!r} {found[key]}")
    for key in sorted(set(found) & set(expected)):
        if found[key] != expected[key]:
            problems.append(f"weights: {key!r} has shape {found[key]}, the config needs {expected[key]}")
    return problems


# The script run by `load_without_package`: hide the package (and optional packages), load through auto_map.
_ISOLATED_LOAD = r"""
import importlib.util, json, os, sys
folder, output, package, hidden, input_ids = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
sys.path[:] = [p for p in sys.path if not os.path.isfile(os.path.join(p or os.getcwd(), package, "__init__.py"))]
def finds_package(finder):
    try:
        return finder.find_spec(package, None) is not None
    except Exception:
        return False
sys.meta_path[:] = [finder for finder in sys.meta_path if not finds_package(finder)]
for name in filter(None, hidden.split(",")):
    sys.modules[name] = None  # `import name` raises ImportError, importlib.util.find_spec(name) is None
try:
    import m2rnn
except ImportError:
    pass
else:
    raise SystemExit(f"could not hide the {package} package from this process: {m2rnn.__file__}")
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
loaded = sorted(name for name in sys.modules if name.split(".")[0] == package)
if loaded:
    raise SystemExit(f"loading imported the {package} package: {loaded}")
with torch.no_grad():
    logits = model(torch.tensor(json.loads(input_ids))).logits
torch.save({"logits": logits, "class": f"{type(model).__module__}.{type(model).__name__}"}, output)
"""


def load_without_package(
    folder: str | os.PathLike,
    input_ids: list[list[int]],
    *,
    hide: tuple[str, ...] = tuple(sorted(OPTIONAL_PACKAGES)),
    timeout: float = 600,
) -> Any:
    """Load `folder` with `trust_remote_code=True` in a fresh Python (`-I`, another working directory) that cannot
    import m2rnn nor the packages in `hide` (default: the optional kernel packages, as on a machine with only torch
    and transformers), and return the logits for `input_ids`, computed with the caller's number of CPU threads so that
    they can be compared bit for bit. Raises RuntimeError with the child's output."""
    import torch

    with tempfile.TemporaryDirectory(prefix="m2rnn-load-check-") as scratch:
        output = Path(scratch) / "logits.pt"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HF_MODULES_CACHE=str(Path(scratch) / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   OMP_NUM_THREADS=str(torch.get_num_threads()))  # the caller's threads: same reduction order
        command = [sys.executable, "-I", "-c", _ISOLATED_LOAD, str(Path(folder).resolve()), str(output), PACKAGE,
                   ",".join(hide), json.dumps(input_ids)]
        result = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"exit status {result.returncode}:\n{(result.stdout + result.stderr)[-4000:]}")
        return torch.load(output, weights_only=True)["logits"]


# ---------------------------------------------------------------------------------------------------------------
# Pushing
# ---------------------------------------------------------------------------------------------------------------
SKIPPED_NAMES = frozenset({"__pycache__", OUTPUT_MARKER, PARTIAL_MARKER})
SKIPPED_SUFFIXES = (".tmp", ".pyc")
PROBE_TIMEOUT = 10.0  # seconds the one reachability check of the Hub may take before `push` gives up


class PushError(OSError):
    """An upload that failed; the message says in one line what failed and what to do."""


def check_repo_id(repo_id: str, option: str = "REPO_ID") -> None:
    """Refuse a repo id the Hub would refuse (huggingface_hub's own rules), naming it and the `option` it came from."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise FolderCheckError(f"{option} {repo_id!r} is not a valid Hub repo id ('name' or 'namespace/name'; "
                               f"letters, digits, '-', '_', '.'): {' '.join(str(error).split())}") from error


def upload_files(folder: str | os.PathLike, *, allow_pickles: bool = False) -> dict[str, Path]:
    """`{path in the repo: local file}` for everything `push` uploads from `folder`.

    Hidden files and folders, `__pycache__`, temporary files and m2rnn's own markers stay behind. Refused, with
    every offender listed (`FolderCheckError`): a symlink whose target lies outside `folder` (its content is not
    part of the checkpoint), a symlink that points nowhere, a symlinked folder, and, unless `allow_pickles`,
    pickle files in subfolders (e.g. a Trainer's `checkpoint-10/optimizer.pt`; top-level pickled weights are
    refused by `check_folder` in any case).
    """
    root = Path(folder).resolve()
    files: dict[str, Path] = {}
    outside, dangling, linked_folders, pickles = [], [], [], []
    for directory, subfolders, names in os.walk(root):
        here = Path(directory)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d not in SKIPPED_NAMES)
        for name in list(subfolders):
            if (here / name).is_symlink():
                linked_folders.append((here / name).relative_to(root).as_posix())
                subfolders.remove(name)
        for name in sorted(names):
            path = here / name
            relative = path.relative_to(root).as_posix()
            if name.startswith(".") or name in SKIPPED_NAMES or name.endswith(SKIPPED_SUFFIXES):
                continue
            if path.is_symlink():
                target = Path(os.path.realpath(path))
                if not target.is_file():
                    dangling.append(relative)
                    continue
                if root not in target.parents:
                    outside.append(f"{relative} -> {target}")
                    continue
            if path.suffix in PICKLE_SUFFIXES and here != root and not allow_pickles:
                pickles.append(relative)
                continue
            files[relative] = path
    problems = []
    if outside:
        problems.append(f"symlinks to files outside the folder (copy the files in instead): {outside}")
    if dangling:
        problems.append(f"symlinks that point nowhere: {dangling}")
    if linked_folders:
        problems.append(f"symlinked folders (copy them in instead): {linked_folders}")
    if pickles:
        problems.append(f"pickle files in subfolders (they run code when loaded; remove them, or pass --allow-pickles "
                        f"(allow_pickles=True) to upload them): {pickles}")
    if problems:
        raise FolderCheckError(f"{folder}: refused to upload:\n- " + "\n- ".join(problems))
    return files


def check_push(folder: str | os.PathLike, repo_id: str, *, load: bool = False,
               allow_pickles: bool = False) -> dict[str, Path]:
    """Everything `push_to_hub` checks before it touches the network or the folder: the repo id, the checkpoint
    (`check_folder`, with `load`) and the files to upload (`upload_files`, returned)."""
    check_repo_id(repo_id)
    check_folder(folder, load=load)
    return upload_files(folder, allow_pickles=allow_pickles)


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
    load_check: bool = False,
    check_only: bool = False,
    allow_pickles: bool = False,
    endpoint: str | None = None,
) -> Any:
    """Check (`check_push`), create the model repo if needed (and the branch `revision`), and upload the folder in
    one commit. Returns huggingface_hub's `CommitInfo`, or None with `check_only` (checks only: nothing is changed
    and nothing is sent).

    `load_check=True` also loads the folder in a process without our package before uploading anything. A
    generated model card is re-rendered so its snippets name `repo_id`; that card is uploaded from memory and
    written into the folder only once the upload has succeeded. The Hub is tried once: when it cannot be reached,
    `PushError` says so in one line.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from m2rnn import __version__
    from m2rnn.model_card import folder_card

    folder = Path(folder)
    files = check_push(folder, repo_id, load=load_check, allow_pickles=allow_pickles)
    card = folder_card(folder, repo_id=repo_id, model_name=repo_id.split("/")[-1])  # None: the user's README
    if check_only:
        return None
    api = HfApi(endpoint=endpoint, token=token, library_name=PACKAGE, library_version=__version__)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                  for name, path in sorted(files.items()) if not (name == "README.md" and card is not None)]
    if card is not None:
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    with _one_line_hub_errors(api.endpoint):
        _probe_hub(api.endpoint, repo_id)
        repo_id = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True).repo_id
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload M2RNN checkpoint (m2rnn {__version__})",
            revision=revision,
            create_pr=create_pr,
        )
    if card is not None and (folder / "README.md").read_text(encoding="utf-8") != card:
        atomic_write_text(folder / "README.md", card)  # the local card now names the repo it was pushed to
    return info


def hub_unreachable(endpoint: str | None = None, path: str = "/api/models") -> str | None:
    """Why the Hub at `endpoint` (default: huggingface_hub's) cannot be reached, or None when one quick request
    (PROBE_TIMEOUT) got any answer, or when HF_HUB_OFFLINE is set (then the libraries use their caches and try
    nothing). huggingface_hub's own calls have no timeout and retry a failed connection for half a minute, which
    offline is only a longer wait for the same error."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.is_offline_mode():
        return None
    endpoint = endpoint or constants.ENDPOINT
    try:
        get_session().get(f"{endpoint}{path}", timeout=PROBE_TIMEOUT)
    except (httpx2.HTTPError, OSError) as error:
        return f"{type(error).__name__}: {' '.join(str(error).split()) or 'no answer'}"
    return None


def _probe_hub(endpoint: str, repo_id: str) -> None:
    """Refuse at once, with `PushError`, when HF_HUB_OFFLINE is set or the Hub does not answer (`hub_unreachable`)."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise PushError("HF_HUB_OFFLINE is set, so nothing was uploaded; unset it to push, or check the folder "
                        "without uploading: m2rnn push --check-only FOLDER REPO_ID")
    reason = hub_unreachable(endpoint, f"/api/models/{repo_id}")
    if reason:
        raise PushError(
            f"cannot reach {endpoint} ({reason}); nothing was uploaded or changed locally. Check the network, or "
            "validate without uploading: m2rnn push --check-only FOLDER REPO_ID (HF_HUB_OFFLINE=1 makes every Hub "
            "call fail at once)"
        )


@contextlib.contextmanager
def _one_line_hub_errors(endpoint: str) -> Iterator[None]:
    """Turn a failed Hub request into one `PushError` line: what failed, that nothing local changed, what to try."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except PushError:
        raise
    except (HfHubHTTPError, OfflineModeIsEnabled, httpx2.HTTPError, OSError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        reason = reason.split(" For more details, see")[0][:300]
        raise PushError(
            f"upload to {endpoint} failed ({type(error).__name__}: {reason}); nothing was changed locally. Check the "
            "network and your token (HF_TOKEN or `hf auth login`), or validate without uploading: "
            "m2rnn push --check-only FOLDER REPO_ID (HF_HUB_OFFLINE=1 makes every Hub call fail at once)"
        ) from error


# ---------------------------------------------------------------------------------------------------------------
# Command line: `m2rnn card` and `m2rnn push`
# ---------------------------------------------------------------------------------------------------------------
def add_hub_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the `card` and `push` subcommands to the `m2rnn` console script."""
    card = subparsers.add_parser(
        "card",
        help="print (or with --write, rewrite) the model card of a saved checkpoint",
        description="Render the model card of the M2RNN checkpoint in FOLDER from its config.json (and the "
        "provenance stored there as `conversion` by convert and heal), with evaluation results from --results. "
        "Prints it, or with --write replaces FOLDER/README.md atomically. Refuses a folder that is not an M2RNN "
        "checkpoint.",
    )
    card.add_argument("folder", metavar="FOLDER")
    card.add_argument("--results", metavar="JSON", help="lm-eval output or {task: {metric: value}} to tabulate "
                      "(default: the results already in a generated card)")
    card.add_argument("--conversion", metavar="JSON", help="conversion metadata (default: config.json's `conversion`)")
    card.add_argument("--repo-id", help="repo id used in the usage snippets (default: a placeholder)")
    card.add_argument("--license", help="license id for the metadata (default: the card's, else apache-2.0)")
    card.add_argument("--write", action="store_true", help="write FOLDER/README.md instead of printing")
    card.add_argument("--force", action="store_true", help="with --write, replace a README that m2rnn did not write")
    card.set_defaults(func=_run_card)

    push = subparsers.add_parser(
        "push",
        help="check a saved checkpoint and upload it to the Hugging Face Hub",
        description="Check REPO_ID and that FOLDER is a loadable M2RNN checkpoint (config, flat code, weights, no "
        "symlinks leaving it, no pickles in subfolders), create REPO_ID if needed and upload FOLDER in one commit. "
        "Nothing in FOLDER changes before the upload succeeded (then a generated README.md names REPO_ID). Uses "
        "HF_TOKEN / `hf auth login` for credentials.",
    )
    push.add_argument("folder", metavar="FOLDER")
    push.add_argument("repo_id", metavar="REPO_ID")
    push.add_argument("--private", action="store_true", help="create the repo private (default: public)")
    push.add_argument("--revision", help="branch to push to, created if missing (default: main)")
    push.add_argument("--commit-message", help="commit message (default: 'Upload M2RNN checkpoint (m2rnn VERSION)')")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--load-check", action="store_true",
                      help="also load FOLDER with trust_remote_code in a process without m2rnn before uploading")
    push.add_argument("--check-only", action="store_true",
                      help="validate REPO_ID and FOLDER and load-check it; change nothing, upload nothing")
    push.add_argument("--allow-pickles", action="store_true",
                      help="upload pickle files found in subfolders (e.g. checkpoint-*/optimizer.pt); refused by "
                      "default. Top-level pickled weights are always refused")
    push.set_defaults(func=_run_push)


def _read_json_argument(path: str | None, option: str) -> Any:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{option} {path}: {' '.join(str(error).split())}") from error


def _run_card(args: argparse.Namespace) -> int:
    from m2rnn.model_card import folder_card, write_model_card

    if args.repo_id is not None:
        check_repo_id(args.repo_id, "--repo-id")
    render = dict(
        results=_read_json_argument(args.results, "--results"),
        conversion=_read_json_argument(args.conversion, "--conversion"),
        repo_id=args.repo_id,
        model_name=args.repo_id.split("/")[-1] if args.repo_id else Path(args.folder).resolve().name,
        license=args.license,
    )
    if args.write:
        written = write_model_card(args.folder, overwrite_user_card=args.force, **render)
        if written is None:
            raise ValueError(f"{Path(args.folder) / 'README.md'} was not written by m2rnn; --force replaces it")
        print(f"wrote {written}")
    else:
        print(folder_card(args.folder, overwrite_user_card=True, **render))
    return 0


def _run_push(args: argparse.Namespace) -> int:
    info = push_to_hub(args.folder, args.repo_id, private=args.private or None, revision=args.revision,
                       commit_message=args.commit_message, create_pr=args.create_pr,
                       load_check=args.load_check or args.check_only, check_only=args.check_only,
                       allow_pickles=args.allow_pickles)
    if args.check_only:
        print(f"{args.folder}: ready to push to {args.repo_id} (checked and load-checked; nothing was uploaded)")
    else:
        print(getattr(info, "commit_url", info))
    return 0
