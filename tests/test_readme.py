"""The README's commands are the ones CI and users run; the supported range is the one CI tests."""

import re
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    test_command = next(block.strip() for block in bash_blocks(readme) if "pytest" in block)
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines, "the README's test command must be a line of .ci/run, verbatim"


def test_readme_opens_with_the_demo_command():
    first_block = bash_blocks((ROOT / "README.md").read_text())[0]
    assert "m2rnn demo" in first_block and "constraints.txt" in first_block


def test_supported_range_starts_at_the_pins():
    """Each pinned package's range in pyproject.toml admits the pin and starts at it (at the bound's precision), so
    the README's pinned install tests the lower end. torch and triton start lower: the GPU sessions ran 2.11 and 3.6."""
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    requirements = re.findall(r'"([A-Za-z0-9_.-]+)((?:[<>=!]=?[\d.]+,?)+)"', (ROOT / "pyproject.toml").read_text())
    checked = set()
    for name, spec in requirements:
        if name not in pins or name in ("torch", "triton"):
            continue
        pin = Version(pins[name])
        assert SpecifierSet(spec).contains(pin), f"{name}{spec} excludes the pin {pin}"
        lower = next(Version(bound[2:]) for bound in spec.split(",") if bound.startswith(">="))
        assert pin.release[: len(lower.release)] == lower.release, f"{name}{spec}: lower bound is not the pin {pin}"
        checked.add(name)
    assert checked >= {"transformers", "accelerate", "peft", "datasets", "lm_eval"}
