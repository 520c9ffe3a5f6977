"""Publishing: flat trust_remote_code export, model cards, and `push` against an in-process fake Hub (no network)."""

from __future__ import annotations

import ast
import base64
import contextlib
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM
from transformers import dynamic_module_utils

from m2rnn import M2RNNConfig, M2RNNForCausalLM
from m2rnn.apps import hub
from m2rnn.apps.cli import main as cli_main
from m2rnn.apps.hub import (
    AUTO_MAP,
    FolderCheckError,
    check_folder,
    load_without_package,
    push_to_hub,
    save_for_hub,
)
from m2rnn.model_card import CARD_MARKER, ModelCardError, render_model_card, write_model_card
from m2rnn.apps.output import OUTPUT_MARKER, OutputError
from m2rnn import remote_code
from m2rnn.remote_code import export_code

INPUT_IDS = [[1, 17, 42, 99, 3, 250, 7, 8]]
CONVERSION = {
    "source": "Qwen/Qwen3.5-0.8B",
    "source_model_type": "qwen3_5",
    "swapped_layers": [0, 3],
    "init": "q/k/v and out_proj copied from the Gated DeltaNet layer, W = I.",
    "healing": {"tokens": "50M", "dataset": "HuggingFaceFW/fineweb-edu"},
    "datasets": ["HuggingFaceFW/fineweb-edu"],
}
LM_EVAL_RESULTS = {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.41, "acc_stderr,none": 0.01},
                               "lambada_openai": {"perplexity,none": 35.5, "acc,none": 0.3}}}


@pytest.fixture(scope="module")
def tiny_model() -> M2RNNForCausalLM:
    torch.manual_seed(0)
    return M2RNNForCausalLM(M2RNNConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def reference_logits(tiny_model) -> torch.Tensor:
    """On one thread, as every test runs (conftest), so that logits compare bit for bit: the reduction order of
    a CPU matmul depends on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return tiny_model(torch.tensor(INPUT_IDS)).logits
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hub_folder(tiny_model, tmp_path_factory) -> Path:
    """A sharded Hub folder (the tiny model is ~0.7 MB in float32; 200KB shards make an index)."""
    return save_for_hub(tiny_model, tmp_path_factory.mktemp("hub") / "tiny-m2rnn", max_shard_size="200KB")


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(INPUT_IDS)).logits


# ---------------------------------------------------------------------------------------------------------------
# Flat export and the saved folder
# ---------------------------------------------------------------------------------------------------------------
def test_exported_code_passes_transformers_import_rules(tmp_path):
    files = export_code()
    assert {"configuration_m2rnn.py", "modeling_m2rnn.py", "m2rnn_kernels_m2rnn_forward.py"} <= set(files)
    for name, source in files.items():
        (tmp_path / name).write_text(source)
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers"}
    for name in files:
        # transformers' own parsers: unguarded absolute imports, and the sibling files it will copy
        assert set(dynamic_module_utils.get_imports(tmp_path / name)) <= allowed, name
        for sibling in dynamic_module_utils.get_relative_imports(tmp_path / name):
            assert (tmp_path / f"{sibling}.py").is_file(), f"{name} imports .{sibling}, which is not exported"
    for name in ("m2rnn_kernels_m2rnn_forward.py", "m2rnn_kernels_m2rnn_backward.py", "m2rnn_kernels_m2rnn_decode.py"):
        assert "try:" in files[name].split("import triton\n")[0][-200:], name


def test_exported_triton_kernels_import_when_triton_is_present(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    package = tmp_path / "flat_m2rnn_export"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, source in export_code().items():
        (package / name).write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    dispatcher = importlib.import_module("flat_m2rnn_export.m2rnn_kernels_m2rnn_op")
    assert dispatcher.m2rnn_recurrence_triton.__module__ == "flat_m2rnn_export.m2rnn_kernels_m2rnn_autograd"


@pytest.mark.parametrize(
    "source, match",
    [
        ("import some_missing_package\n", "'some_missing_package' outside `try`"),
        ("from m2rnn.kernels import m2rnn_recurrence\n", "absolute import of 'm2rnn'"),
        ("from . import kernels\n", "cannot be flattened"),
        ("def kernel():\n    import triton\n", "'triton' outside `try`"),
    ],
)
def test_export_refuses_code_that_would_not_load_remotely(source, match):
    module = remote_code._Module("m2rnn.example", remote_code.PACKAGE_DIR / "example.py", False, source, ast.parse(source))
    with pytest.raises(remote_code.HubExportError, match=match):
        remote_code._flatten_source(module, set(), "0")


def test_write_hub_files_completes_a_converter_folder(tiny_model, tmp_path):
    """A converter writes config + safetensors only; `write_hub_files` adds code, auto_map and the card."""
    from safetensors.torch import save_file

    tiny_model.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, tmp_path / "model.safetensors")
    with pytest.raises(FolderCheckError, match="auto_map"):
        check_folder(tmp_path)
    remote_code.write_hub_files(tmp_path, conversion=CONVERSION)
    check_folder(tmp_path)
    assert ModelCard.load(tmp_path / "README.md").data.base_model == "Qwen/Qwen3.5-0.8B"


def test_save_for_hub_writes_a_complete_sharded_folder(hub_folder):
    names = {p.name for p in hub_folder.iterdir()}
    assert {"config.json", "generation_config.json", "README.md", "model.safetensors.index.json"} <= names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    assert not [n for n in names if n.startswith(".") and n != OUTPUT_MARKER], "temporary files left behind"
    config = json.loads((hub_folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    for reference in AUTO_MAP.values():
        assert (hub_folder / f"{reference.split('.')[0]}.py").is_file()
    check_folder(hub_folder)


def test_save_pretrained_writes_hub_files_and_package_loads_without_remote_code(tiny_model, reference_logits, tmp_path):
    tiny_model.save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert (tmp_path / "plain" / "modeling_m2rnn.py").is_file()
    assert CARD_MARKER in (tmp_path / "plain" / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")  # no trust_remote_code: our registration
    assert type(reloaded) is M2RNNForCausalLM
    torch.testing.assert_close(_logits(reloaded), reference_logits, rtol=0, atol=0)


def test_save_pretrained_keeps_a_user_readme(tiny_model, tmp_path):
    (tmp_path / "README.md").write_text("# my own card\n")
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my own card\n"


def test_save_for_hub_refuses_to_clobber_a_folder(tiny_model, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="overwrite"):
        save_for_hub(tiny_model, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_save_for_hub_includes_the_tokenizer(tiny_model, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "<unk>": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    folder = save_for_hub(tiny_model, tmp_path / "with-tokenizer", tokenizer)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert AutoTokenizer.from_pretrained(folder)("hello world")["input_ids"] == [3, 4]
    check_folder(folder)


# ---------------------------------------------------------------------------------------------------------------
# Model cards
# ---------------------------------------------------------------------------------------------------------------
def test_card_of_a_fresh_model_has_valid_metadata(tiny_model):
    card = ModelCard(str(render_model_card(tiny_model.config, repo_id="me/tiny-m2rnn")))
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0"
    assert {"m2rnn", "custom_code", "gated-deltanet", "mixture-of-experts"} <= set(data["tags"])
    assert "base_model" not in data
    text = card.text
    assert "`MGAM`" in text and "| 2 | attention |" in text  # the layer pattern and its table
    assert "4 × 16 × 8" in text and "KV cache of" in text  # state per layer vs KV per token
    assert "2603.14360" in text and "@article" in text
    for snippet in ('from_pretrained("me/tiny-m2rnn", trust_remote_code=True', "Trainer(", "LoraConfig(", "lm_eval "):
        assert snippet in text


def test_card_of_a_converted_model_with_results(tiny_model):
    card = ModelCard(str(render_model_card(tiny_model.config, conversion=CONVERSION, results=LM_EVAL_RESULTS,
                                           repo_id="me/qwen-m2rnn")))
    data = card.data
    assert data.base_model == "Qwen/Qwen3.5-0.8B" and data.datasets == ["HuggingFaceFW/fineweb-edu"]
    assert "converted" in data.tags
    scores = {(r.dataset_type, r.metric_type): r.metric_value for r in data.eval_results}
    assert scores == {("arc_easy", "acc"): 0.41, ("lambada_openai", "perplexity"): 35.5, ("lambada_openai", "acc"): 0.3}
    assert "| 0 | M2RNN (swapped in) |" in card.text and "qwen3_5" in card.text
    assert "| arc_easy | acc | 0.4100 | 0.0100 |" in card.text and "dataset = HuggingFaceFW/fineweb-edu" in card.text


def test_card_reads_conversion_metadata_from_the_config():
    config = M2RNNConfig.from_preset("tiny", conversion=CONVERSION)
    assert ModelCard(str(render_model_card(config))).data.base_model == "Qwen/Qwen3.5-0.8B"


@pytest.mark.parametrize(
    "kwargs, match",
    [({"conversion": {"sorce": "x/y"}}, "sorce"), ({"conversion": {"swapped_layers": "0"}}, "swapped_layers"),
     ({"results": {"arc": "high"}}, "arc")],
)
def test_card_rejects_bad_inputs(tiny_model, kwargs, match):
    with pytest.raises(ModelCardError, match=match):
        render_model_card(tiny_model.config, **kwargs)


def test_failed_card_write_leaves_the_readme_intact(hub_folder, tmp_path, monkeypatch):
    readme = hub_folder / "README.md"
    before = readme.read_text()
    monkeypatch.setattr("m2rnn.model_card.render_model_card", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        write_model_card(hub_folder)
    monkeypatch.undo()

    def fail_replace(*args):  # the rename of the finished temporary file fails: README and folder untouched
        raise OSError("disk full")

    monkeypatch.setattr("m2rnn.remote_code.os.replace", fail_replace)
    with pytest.raises(OSError, match="disk full"):
        write_model_card(hub_folder, results=LM_EVAL_RESULTS)
    assert readme.read_text() == before
    assert not [p.name for p in hub_folder.iterdir() if p.name.startswith(".") and p.name != OUTPUT_MARKER]


def test_cli_card_prints_and_rewrites(hub_folder, tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(LM_EVAL_RESULTS))
    assert cli_main(["card", str(hub_folder), "--results", str(results)]) == 0
    assert "| arc_easy | acc | 0.4100 |" in capsys.readouterr().out
    assert "## Evaluation results" not in (hub_folder / "README.md").read_text()  # printing does not write

    assert cli_main(["card", str(hub_folder), "--results", str(results), "--write"]) == 0
    card = ModelCard.load(hub_folder / "README.md")
    assert {r.dataset_type for r in card.data.eval_results} == {"arc_easy", "lambada_openai"}
    assert cli_main(["card", str(hub_folder), "--write"]) == 0  # a re-render keeps the results
    assert len(ModelCard.load(hub_folder / "README.md").data.eval_results) == 3

    user_folder = tmp_path / "user"
    user_folder.mkdir()
    for name in ("config.json",):
        (user_folder / name).write_text((hub_folder / name).read_text())
    (user_folder / "README.md").write_text("mine\n")
    assert cli_main(["card", str(user_folder), "--write"]) == 1
    assert (user_folder / "README.md").read_text() == "mine\n"


# ---------------------------------------------------------------------------------------------------------------
# Pushing to an in-process fake Hub
# ---------------------------------------------------------------------------------------------------------------
class FakeHub:
    """The five endpoints the publishing path calls (hf-ecosystem.md §5.2), recording what it receives."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}  # "repo@revision" → path → bytes
        self.requests: list[str] = []
        self.unknown: list[str] = []
        self.refuse_commits = False  # answer 403 to commits, as the Hub does for a repo one cannot write to

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append(f"{request.method} {path}")
        if request.method == "POST" and path == "/api/repos/create":
            body = json.loads(request.content)
            repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            self.repos[repo_id] = body
            return httpx2.Response(200, json={"url": f"{self.endpoint}/{repo_id}"})
        if request.method == "GET" and path == "/api/agent-harnesses":  # huggingface_hub's best-effort user-agent lookup
            return httpx2.Response(404)
        if request.method == "GET" and path.startswith("/api/models/") and len(path.split("/")) == 5:  # the probe
            repo_id = "/".join(path.split("/")[3:5])
            return httpx2.Response(200 if repo_id in self.repos else 404, json={"id": repo_id})
        if request.method == "POST" and path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        parts = path.split("/")
        if request.method == "POST" and path.startswith("/api/models/") and parts[5] == "preupload":
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                        for f in files], "commitOid": "0" * 40})
        if request.method == "POST" and path.startswith("/api/models/") and parts[5] == "branch":
            return httpx2.Response(200, json={})
        if request.method == "POST" and path.startswith("/api/models/") and parts[5] == "commit" and self.refuse_commits:
            return httpx2.Response(403, json={"error": "You don't have the rights to create a commit in this repo"})
        if request.method == "POST" and path.startswith("/api/models/") and parts[5] == "commit":
            repo_id, revision = "/".join(parts[3:5]), "/".join(parts[6:])
            received = self.files.setdefault(f"{repo_id}@{revision}", {})
            for line in request.content.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    received[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return httpx2.Response(200, json={"commitOid": "1" * 40, "commitUrl": f"{self.endpoint}/{repo_id}/commit/1"})
        self.unknown.append(f"{request.method} {path}")
        return httpx2.Response(404, json={"error": "not in the fake hub"})


@contextlib.contextmanager
def serve_fake_hub():
    """Route huggingface_hub's HTTP client to a FakeHub; the endpoint is a refused port, so nothing escapes."""
    endpoint = "http://127.0.0.1:9"
    hub = FakeHub(endpoint)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_ENDPOINT", endpoint)
        patch.setenv("HF_TOKEN", "hf_fake_token")
        patch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
        huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
        try:
            yield hub
        finally:
            huggingface_hub.set_client_factory(httpx2.Client)


@pytest.fixture
def fake_hub():
    with serve_fake_hub() as hub:
        yield hub


@pytest.fixture(scope="module")
def pushed(hub_folder, tmp_path_factory) -> tuple[FakeHub, Path, dict[str, bytes]]:
    """Push the Hub folder to a fake Hub; returns the hub, a folder holding the bytes it received, and the pushed
    folder's bytes at push time (other tests rewrite its README later)."""
    with serve_fake_hub() as hub:
        info = push_to_hub(hub_folder, "me/tiny-m2rnn", private=True, endpoint=hub.endpoint)
    assert info.oid == "1" * 40
    sent = {path.name: path.read_bytes() for path in hub_folder.iterdir() if path.name != OUTPUT_MARKER}
    received = tmp_path_factory.mktemp("received")
    for name, content in hub.files["me/tiny-m2rnn@main"].items():
        (received / name).write_bytes(content)
    return hub, received, sent


def test_push_uploads_every_file_of_the_folder(pushed):
    hub, received, sent = pushed
    assert hub.unknown == [] and hub.repos["me/tiny-m2rnn"].get("visibility") == "private"
    assert {path.name: path.read_bytes() for path in received.iterdir()} == sent
    assert (hub.endpoint and OUTPUT_MARKER not in hub.files["me/tiny-m2rnn@main"])  # m2rnn's own marker stays home
    card = ModelCard((received / "README.md").read_text())
    assert "m2rnn" in card.data.tags and 'from_pretrained("me/tiny-m2rnn"' in card.text


def test_pushed_files_load_without_the_package(pushed, reference_logits, monkeypatch):
    """The received folder (byte-identical to the saved one) loads in a `python -I` child, run from another
    directory, where `import m2rnn` and `import triton` fail, with logits equal to the original model's. The
    child's result is read back with `torch.load(weights_only=True)`: no pickle runs code here."""
    _, received, _ = pushed
    calls = []
    original_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(kwargs) or original_load(*args, **kwargs))
    logits = load_without_package(received, INPUT_IDS)
    assert calls == [{"weights_only": True}]
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=0)


def test_cli_push_to_a_branch(hub_folder, fake_hub, capsys):
    code = cli_main(["push", str(hub_folder), "me/tiny-m2rnn", "--revision", "v1", "--commit-message", "first"])
    assert code == 0, capsys.readouterr().err
    assert "POST /api/models/me/tiny-m2rnn/branch/v1" in fake_hub.requests
    assert "config.json" in fake_hub.files["me/tiny-m2rnn@v1"]


@pytest.mark.parametrize("damage", ["drop_tensor", "wrong_shape", "truncated_shard", "no_auto_map", "pickle"])
def test_push_refuses_a_folder_that_does_not_load(tiny_model, tmp_path, fake_hub, damage, capsys):
    from safetensors.torch import load_file, save_file

    folder = save_for_hub(tiny_model, tmp_path / "broken")
    weights = folder / "model.safetensors"
    state = load_file(weights)
    if damage == "drop_tensor":
        state.pop("model.layers.0.mixer.state_weight")
        save_file(state, weights, metadata={"format": "pt"})
        match = "model.layers.0.mixer.state_weight.*missing"
    elif damage == "wrong_shape":
        state["model.norm.weight"] = torch.ones(3)
        save_file(state, weights, metadata={"format": "pt"})
        match = "model.norm.weight.*shape"
    elif damage == "truncated_shard":
        weights.write_bytes(weights.read_bytes()[:1000])
        match = "model.safetensors: not a readable safetensors file"
    elif damage == "no_auto_map":
        config = json.loads((folder / "config.json").read_text())
        del config["auto_map"]
        (folder / "config.json").write_text(json.dumps(config))
        match = "auto_map"
    else:
        torch.save(state, folder / "pytorch_model.bin")
        match = "pickled weights"
    with pytest.raises(FolderCheckError, match=match):
        push_to_hub(folder, "me/broken", endpoint=fake_hub.endpoint)
    assert cli_main(["push", str(folder), "me/broken"]) == 1
    error = capsys.readouterr().err.splitlines()[-1]  # one line (the fixture's save printed its bars before)
    assert error.startswith("m2rnn push: error:") and "not a loadable M2RNN checkpoint" in error
    assert fake_hub.requests == []  # nothing was sent


# ---------------------------------------------------------------------------------------------------------------
# push: nothing changes before the upload worked; what is refused; --check-only; offline in one line
# ---------------------------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def run_m2rnn(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`m2rnn ARGS` through the installed console script, importing this checkout's package."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([str(Path(sys.executable).parent / "m2rnn"), *args], env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mode) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def fresh_folder(tiny_model, tmp_path) -> Path:
    return save_for_hub(tiny_model, tmp_path / "tiny-m2rnn")


@pytest.mark.parametrize("repo_id", ["bad id!", "a/b/c", "name--x", ""])
def test_push_validates_the_repo_id_before_anything(fresh_folder, fake_hub, repo_id, capsys):
    """Today's main rewrote README.md (the card names the repo) before the repo id was refused."""
    before = _snapshot(fresh_folder)
    assert cli_main(["push", str(fresh_folder), repo_id]) == 1
    assert f"REPO_ID {repo_id!r} is not a valid Hub repo id" in capsys.readouterr().err
    assert _snapshot(fresh_folder) == before and fake_hub.requests == []


def test_a_refused_upload_changes_nothing_and_a_successful_one_updates_the_card(fresh_folder, fake_hub):
    before = _snapshot(fresh_folder)
    fake_hub.refuse_commits = True  # the Hub answers 403 to the commit
    with pytest.raises(hub.PushError, match="upload to .* failed .*403.*nothing was changed locally.*--check-only"):
        push_to_hub(fresh_folder, "me/tiny-m2rnn", endpoint=fake_hub.endpoint)
    assert _snapshot(fresh_folder) == before
    fake_hub.refuse_commits = False
    push_to_hub(fresh_folder, "me/tiny-m2rnn", endpoint=fake_hub.endpoint)
    sent = fake_hub.files["me/tiny-m2rnn@main"]["README.md"]
    assert b'from_pretrained("me/tiny-m2rnn"' in sent and (fresh_folder / "README.md").read_bytes() == sent


def test_check_only_validates_and_load_checks_without_changing_or_sending_anything(fresh_folder, fake_hub, capsys):
    before = _snapshot(fresh_folder)
    assert cli_main(["push", str(fresh_folder), "me/tiny-m2rnn", "--check-only"]) == 0
    assert "ready to push to me/tiny-m2rnn" in capsys.readouterr().out
    assert _snapshot(fresh_folder) == before and fake_hub.requests == []
    (fresh_folder / "modeling_m2rnn.py").write_text("raise ImportError('broken on purpose')\n")
    assert cli_main(["push", str(fresh_folder), "me/tiny-m2rnn", "--check-only"]) == 1  # the load check ran
    assert "does not load without the m2rnn package" in capsys.readouterr().err
    assert fake_hub.requests == []


def test_push_refuses_outside_symlinks_and_subfolder_pickles_listing_them(fresh_folder, tmp_path, fake_hub, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the checkpoint")
    (fresh_folder / "notes.txt").symlink_to(secret)
    (fresh_folder / "checkpoint-10").mkdir()
    torch.save({"step": torch.zeros(1)}, fresh_folder / "checkpoint-10" / "optimizer.pt")
    (fresh_folder / "checkpoint-10" / "trainer_state.json").write_text("{}")
    before = _snapshot(fresh_folder)
    assert cli_main(["push", str(fresh_folder), "me/tiny-m2rnn"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "notes.txt -> " in error and str(secret) in error and "checkpoint-10/optimizer.pt" in error
    assert "--allow-pickles" in error and fake_hub.requests == [] and _snapshot(fresh_folder) == before

    (fresh_folder / "notes.txt").unlink()
    (fresh_folder / "notes.txt").symlink_to(fresh_folder / "config.json")  # a link inside the folder is fine
    assert cli_main(["push", str(fresh_folder), "me/tiny-m2rnn", "--allow-pickles"]) == 0, capsys.readouterr().err
    received = fake_hub.files["me/tiny-m2rnn@main"]
    assert {"checkpoint-10/optimizer.pt", "checkpoint-10/trainer_state.json", "notes.txt"} <= set(received)
    assert received["notes.txt"] == (fresh_folder / "config.json").read_bytes()
    assert OUTPUT_MARKER not in received and not [name for name in received if "/." in name or name.startswith(".")]


@pytest.mark.parametrize("offline", ["unreachable", "HF_HUB_OFFLINE"])
def test_push_entry_point_offline_fails_fast_in_one_line(fresh_folder, offline):
    before = _snapshot(fresh_folder)
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_fake"}  # port 9: connection refused at once
    if offline == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
    started = time.monotonic()
    result = run_m2rnn("push", str(fresh_folder), "me/tiny-m2rnn", env=env)
    assert time.monotonic() - started < 60  # today: 30-55 s of retries, then a 60-line traceback
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("m2rnn push: error:"), result.stderr
    assert "--check-only" in lines[0] and ("HF_HUB_OFFLINE" in lines[0])
    assert _snapshot(fresh_folder) == before


# ---------------------------------------------------------------------------------------------------------------
# card: only for M2RNN checkpoints; provenance of converted models
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["empty", "llama", "missing", "list_config", "bad_repo_id"])
def test_card_refuses_a_folder_that_is_not_an_m2rnn_checkpoint(tiny_model, tmp_path, case, capsys):
    """Today's main invents an M2RNN card for any folder, and --write puts it there."""
    folder = tmp_path / "folder"
    if case != "missing":
        folder.mkdir()
    if case == "llama":
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    elif case == "list_config":
        (folder / "config.json").write_text("[1, 2]")
    expected = {"empty": "no config.json", "llama": "model_type='llama', not an M2RNN checkpoint",
                "missing": "is not a folder", "list_config": "not a JSON object",
                "bad_repo_id": "--repo-id 'me/bad id' is not a valid Hub repo id"}[case]
    if case == "bad_repo_id":  # a card whose snippets name a repo that cannot exist
        folder.rmdir()
        tiny_model.save_pretrained(folder)
        (folder / "README.md").unlink()
        for write in ([], ["--write"]):
            assert cli_main(["card", str(folder), "--repo-id", "me/bad id", *write]) == 1
            assert expected in capsys.readouterr().err
        assert not (folder / "README.md").exists()
        return
    for write in ([], ["--write"]):
        assert cli_main(["card", str(folder), *write]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("m2rnn card: error:") and expected in err
    if case == "llama":  # once through the console script, as a user runs it
        result = run_m2rnn("card", str(folder), "--write")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and expected in lines[0], result.stderr
    assert not (folder / "README.md").exists()


def test_card_of_a_converted_model_never_claims_the_paper_init(tiny_model, tmp_path):
    text = str(render_model_card(tiny_model.config, conversion=CONVERSION))
    assert "**Converted from** [Qwen/Qwen3.5-0.8B]" in text and "**Swapped layers**" in text
    assert CONVERSION["init"] in text and "paper's initialisation" not in text
    local = ModelCard(str(render_model_card(tiny_model.config, conversion={**CONVERSION, "source": "/data/qwen"})))
    assert local.data.base_model is None and "`/data/qwen` (`qwen3_5`) (a local checkpoint)" in local.text


def test_saved_and_card_files_honour_the_umask(tiny_model, tmp_path):
    previous = os.umask(0o022)
    try:
        tiny_model.save_pretrained(tmp_path / "saved")
        write_model_card(tmp_path / "saved", results=LM_EVAL_RESULTS)
        (tmp_path / "saved" / "config.json").chmod(0o600)  # a mode the user chose is kept by the next save
        tiny_model.save_pretrained(tmp_path / "saved")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "saved").iterdir()}
    assert modes.pop("config.json") == 0o600
    assert set(modes.values()) == {0o644}, modes


def test_save_pretrained_push_uploads_the_complete_folder(tiny_model, tmp_path, fake_hub):
    """`save_pretrained(push_to_hub=True)` uploads after the flat code, auto_map and card are written."""
    tiny_model.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="me/saved")
    received = fake_hub.files["me/saved@main"]
    assert fake_hub.unknown == []
    assert {"config.json", "model.safetensors", "modeling_m2rnn.py", "configuration_m2rnn.py", "README.md"} <= set(received)
    assert json.loads(received["config.json"])["auto_map"] == AUTO_MAP
    assert not [name for name in received if name.startswith(".")]
