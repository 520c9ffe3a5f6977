"""The applications' old import paths still work: each warns once (FutureWarning naming the new path) and hands back
the very module at `m2rnn.apps...`, so names and classes stay identical."""

import importlib
import sys
import warnings

import pytest

ALIASES = [
    ("m2rnn.hub", "m2rnn.apps.hub", "push_to_hub"),
    ("m2rnn.demo", "m2rnn.apps.demo", "run_demo"),
    ("m2rnn.utils", "m2rnn.apps.output", "staged_output"),
    ("m2rnn.eval", "m2rnn.apps.eval", "s3"),
    ("m2rnn.eval.s3", "m2rnn.apps.eval.s3", "evaluate_s3"),
    ("m2rnn.eval.common", "m2rnn.apps.eval.common", "load_model"),
    ("m2rnn.heal", "m2rnn.apps.heal", "heal_checkpoint"),
    ("m2rnn.heal.healing", "m2rnn.apps.heal.healing", "HealSettings"),
    ("m2rnn.conversion", "m2rnn.apps.conversion", "convert_checkpoint"),
    ("m2rnn.conversion.io", "m2rnn.apps.conversion.io", "ConversionError"),
]


def forget(old: str) -> None:
    """Drop the alias (and the package alias above it) so that the next import runs the shim again."""
    top = ".".join(old.split(".")[:2])
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]


@pytest.mark.parametrize("old, new, attribute", ALIASES, ids=[old for old, _, _ in ALIASES])
def test_old_path_warns_once_and_is_the_new_module(old, new, attribute):
    forget(old)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
        again = importlib.import_module(old)
    moved = [w for w in caught if issubclass(w.category, FutureWarning)]
    assert len(moved) == 1, [str(w.message) for w in caught]
    assert new.rsplit(".", 1)[0] in str(moved[0].message) or new in str(moved[0].message)
    assert module is again is importlib.import_module(new)
    assert getattr(module, attribute) is getattr(importlib.import_module(new), attribute)


def test_from_import_of_old_names_works():
    forget("m2rnn.utils")
    with pytest.warns(FutureWarning, match=r"m2rnn\.apps\.output"):
        from m2rnn.utils import OUTPUT_MARKER, OutputError, check_output, staged_output  # noqa: F401
    from m2rnn.apps import output

    assert staged_output is output.staged_output and OutputError is output.OutputError


def test_the_installed_console_script_path_still_runs():
    """`m2rnn.cli:main` is where an install made before the move points its `m2rnn` script."""
    from m2rnn.apps.cli import main
    from m2rnn.cli import main as old_main

    assert old_main is main
