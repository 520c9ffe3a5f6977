"""The one output-safety rule every command that writes a folder follows (examples use it too).

The rule (`check_output`, then `staged_output`):

- an existing output is replaced only with `overwrite=True`, and only when this project wrote it (it holds the
  marker file `OUTPUT_MARKER`) or it is an empty folder;
- never when it equals, contains or lies inside any input path, and never `/`, the home folder or the working
  folder;
- the new output is built in a hidden temporary folder beside it (`.NAME.*.partial`) and renamed into place only
  once complete; the old one is removed only after that rename worked;
- partial folders of ours left by a killed run (their owning process is gone) are removed on the next run that
  writes to the same output, with a note on stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from m2rnn.remote_code import current_umask

OUTPUT_MARKER = ".m2rnn-output.json"
"""Written into every output folder this project creates; `--overwrite` replaces only folders that hold it."""

PARTIAL_MARKER = ".m2rnn-partial.json"
"""Written into a staging folder while it is being filled: names the process that owns it."""


class OutputError(ValueError):
    """An output path that the safety rule refuses; the message names the path and why."""


PathLike = str | os.PathLike


def _resolved(path: PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def written_by_m2rnn(folder: PathLike) -> bool:
    """True when `folder` holds the marker file that this project writes into its outputs."""
    return (Path(folder) / OUTPUT_MARKER).is_file()


def check_output(output: PathLike, inputs: Iterable[PathLike | None] = (), overwrite: bool = False,
                 option: str = "output") -> Path:
    """Refuse, before any work, an `output` that the safety rule does not allow; returns it resolved.

    `inputs` are every path the command reads (None entries are skipped; Hub ids that are not local paths are
    harmless: they resolve to paths that do not exist and cannot overlap a real output). `option` names the
    argument in the error messages (e.g. "--output-dir").
    """
    target = _resolved(output)
    protected = {Path("/"): "the file-system root", _resolved("~"): "your home folder",
                 Path.cwd().resolve(): "the working folder"}
    for folder, what in protected.items():
        if _is_within(folder, target):
            raise OutputError(f"{option} {str(output)!r} is, or contains, {what}; choose a new folder for the output")
    for given in inputs:
        if given is None:
            continue
        source = _resolved(given)
        if _is_within(target, source):
            raise OutputError(f"{option} {str(output)!r} is, or lies inside, the input {str(given)!r}; inputs are never written")
        if _is_within(source, target):
            raise OutputError(f"{option} {str(output)!r} contains the input {str(given)!r}; replacing it would delete the input")
    blocking_file = next((parent for parent in target.parents if parent.exists() and not parent.is_dir()), None)
    if blocking_file is not None:
        raise OutputError(f"{option} {str(output)!r} lies below {str(blocking_file)!r}, which is a file, not a folder")
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise OutputError(f"{option} {str(output)!r} already exists; pass --overwrite (overwrite=True) to replace it")
        if target.is_symlink() or not target.is_dir():
            raise OutputError(f"{option} {str(output)!r} exists and is not a folder; m2rnn replaces only folders it wrote")
        if any(target.iterdir()) and not written_by_m2rnn(target):
            raise OutputError(
                f"{option} {str(output)!r} exists and was not written by m2rnn (no {OUTPUT_MARKER}); "
                "--overwrite replaces only m2rnn's own outputs: remove it yourself or choose another folder"
            )
    return target


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_partials(target: PathLike) -> list[Path]:
    """Remove `.NAME.*.partial` / `.NAME.*.old` folders of ours beside `target` whose owning process is gone.

    Only folders holding `PARTIAL_MARKER` are touched; a backup whose rename never finished is put back as `target`
    when `target` is missing. Each action is reported on stderr. Returns the removed folders.
    """
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for candidate in sorted(target.parent.glob(f".{target.name}.*")):
        if not candidate.is_dir() or candidate.is_symlink():
            continue
        if not candidate.name.endswith((".partial", ".old")):
            continue
        marker = candidate / PARTIAL_MARKER
        try:
            owner = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(owner, dict) or owner.get("host") != os.uname().nodename:
            continue
        pid = owner.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and _process_alive(pid):
            continue
        if candidate.name.endswith(".old") and (candidate / "old").is_dir() and not target.exists():
            os.replace(candidate / "old", target)  # killed between moving the old output aside and the rename
            print(f"m2rnn: restored {target} from {candidate}, left by an interrupted run (process {pid})",
                  file=sys.stderr)
        shutil.rmtree(candidate, ignore_errors=True)
        print(f"m2rnn: removed {candidate}, left by an interrupted run (process {pid})", file=sys.stderr)
        removed.append(candidate)
    return removed


@contextmanager
def staged_folder(target: PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target` to write into; it becomes `target` on success.

    On failure the temporary folder is deleted and `target` is left as it was, so a crash never leaves a partial
    output behind and never loses what was there. An existing `target` is moved aside and removed only once the
    rename has worked. Callers decide beforehand whether replacing an existing `target` is allowed (see
    `staged_output`, which applies the project's rule). The result carries `OUTPUT_MARKER`.
    """
    target = Path(os.path.expanduser(os.fspath(target)))
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(target)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        staging.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would make the result private to its owner
        owner = {"pid": os.getpid(), "host": os.uname().nodename}
        (staging / PARTIAL_MARKER).write_text(json.dumps(owner))
        yield staging
        (staging / PARTIAL_MARKER).unlink(missing_ok=True)
        if not (staging / OUTPUT_MARKER).exists():
            (staging / OUTPUT_MARKER).write_text(json.dumps({"written_by": "m2rnn"}) + "\n")
        _replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def staged_output(output: PathLike, inputs: Iterable[PathLike | None] = (), overwrite: bool = False,
                  option: str = "output") -> Iterator[Path]:
    """`check_output` (refuse before any work), then `staged_folder`: the one way a command writes a folder."""
    check_output(output, inputs, overwrite, option)
    with staged_folder(output) as staging:
        yield staging


def _replace_folder(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing `target` is moved aside first and removed only once the rename worked."""
    backup = None
    if target.exists():
        backup = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old")) / "old"
        (backup.parent / PARTIAL_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
        os.replace(target, backup)
    try:
        os.replace(new, target)
    except BaseException:
        if backup is not None:
            os.replace(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup.parent, ignore_errors=True)
