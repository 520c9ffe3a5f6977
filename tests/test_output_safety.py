"""The one output-safety rule (m2rnn.apps.output): what `--overwrite` may replace, partial folders, stale cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from m2rnn.apps.output import OUTPUT_MARKER, PARTIAL_MARKER, OutputError, check_output, staged_output


def _ours(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / OUTPUT_MARKER).write_text("{}")
    (folder / "results.json").write_text("{}")
    return folder


def test_new_output_is_written_with_marker(tmp_path):
    with staged_output(tmp_path / "out") as staging:
        (staging / "a.txt").write_text("a")
    assert (tmp_path / "out" / "a.txt").read_text() == "a"
    assert (tmp_path / "out" / OUTPUT_MARKER).is_file()
    assert not list(tmp_path.glob(".out.*"))


def test_existing_output_needs_overwrite(tmp_path):
    out = _ours(tmp_path / "out")
    with pytest.raises(OutputError, match="already exists.*--overwrite"):
        check_output(out)
    with staged_output(out, overwrite=True) as staging:
        (staging / "b.txt").write_text("b")
    assert (out / "b.txt").exists() and not (out / "results.json").exists()


def test_overwrite_refuses_a_folder_we_did_not_write(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="not written by m2rnn"):
        check_output(theirs, overwrite=True)
    assert (theirs / "thesis.tex").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    check_output(empty, overwrite=True)  # an empty folder holds nothing to lose


@pytest.mark.parametrize("relation", ["equal", "output_inside_input", "input_inside_output"])
def test_overwrite_never_touches_an_input(tmp_path, relation):
    models = _ours(tmp_path / "models")
    src = _ours(models / "src")
    out = {"equal": src, "output_inside_input": src / "out", "input_inside_output": models}[relation]
    with pytest.raises(OutputError, match="input"):
        check_output(out, inputs=[src], overwrite=True)
    assert (src / "results.json").exists()


def test_protected_folders(tmp_path, monkeypatch):
    work = _ours(tmp_path / "work")
    monkeypatch.chdir(work)
    for bad in [".", "..", "/", "~"]:
        with pytest.raises(OutputError, match="choose a new folder"):
            check_output(bad, overwrite=True)


def test_failure_leaves_old_output_and_no_partial(tmp_path):
    out = _ours(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with staged_output(out, overwrite=True) as staging:
            (staging / "half").write_text("x")
            raise RuntimeError("boom")
    assert (out / "results.json").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_killed_run_partial_is_cleaned_next_time(tmp_path):
    script = (
        "import os, signal\n"
        "from m2rnn.apps.output import staged_output\n"
        f"with staged_output({str(tmp_path / 'out')!r}) as s:\n"
        "    (s / 'big.bin').write_bytes(b'0' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=False)
    partials = list(tmp_path.glob(".out.*.partial"))
    assert len(partials) == 1 and (partials[0] / PARTIAL_MARKER).exists()
    with staged_output(tmp_path / "out") as staging:
        (staging / "ok").write_text("ok")
    assert not list(tmp_path.glob(".out.*.partial"))
    assert (tmp_path / "out" / "ok").exists()


def test_partial_of_a_live_process_or_not_ours_is_kept(tmp_path):
    live = tmp_path / ".out.abc.partial"
    live.mkdir()
    (live / PARTIAL_MARKER).write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    foreign = tmp_path / ".out.xyz.partial"
    foreign.mkdir()
    with staged_output(tmp_path / "out"):
        pass
    assert live.exists() and foreign.exists()


def test_output_honours_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with staged_output(tmp_path / "out") as staging:
            (staging / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_output_below_a_file_and_home_expansion(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(OutputError, match="which is a file"):
        check_output(tmp_path / "notes.txt" / "out")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "..")
    with staged_output("~/out") as staging:
        (staging / "f").write_text("x")
    assert (tmp_path / "out" / "f").exists() and not (tmp_path / ".." / "~").exists()
