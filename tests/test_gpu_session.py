"""``scripts/gpu_session.sh`` is run only on a lent GPU, a few minutes per session, and never
by CI: every command in it must at least parse here, or a session's device time is spent
on a usage error. Each ``$PY scripts/<bench>.py ...`` and ``$PY -m jds ...`` line is run
up to its argument parser (nothing is computed), its ``--model`` is a preset, and each
pytest line names files that exist and a ``-k`` whose terms name tests in them."""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_session.sh"


class _Parsed(Exception):
    """Raised by the patched ``parse_args`` once the arguments are known."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.parsed = args


def commands() -> list[list[str]]:
    """Each ``$PY ...`` command of the script's phases, as argv (continuation lines joined,
    shell variables given placeholder values)."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    out, loop = [], None  # loop: (variable, its values) of an enclosing ``for``
    for line in text.splitlines():
        if (f := re.match(r"\s*for (\w+) in ([\w ]+); do", line)) is not None:
            loop = (f.group(1), f.group(2).split())
        elif line.strip() == "done":
            loop = None
        m = re.search(r"\$PY (scripts/\S+\.py|-m (?:jds|pytest)) (.*)$", line)
        if m is None:
            continue
        rest = re.sub(r"\$\{TMPDIR:-/tmp\}|\$OUT", "/tmp", m.group(2))
        rest = rest.replace('"$fw"', "jds,torch")
        for value in loop[1] if loop else [None]:
            r = rest if value is None else rest.replace(f"${loop[0]}", value)
            out.append(m.group(1).split() + shlex.split(r))
    return out


def parse(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """``argv`` run until its parser has parsed it (SystemExit on a usage error)."""
    real = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    try:
        if argv[0] == "-m":
            from jds.cli import main
            main(argv[2:])
        else:
            monkeypatch.setattr(sys, "argv", [str(ROOT / argv[0]), *argv[1:]])
            runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
    except _Parsed as e:
        return e.parsed
    raise AssertionError(f"{argv}: no argument parser ran")


def test_the_script_lists_every_phase_it_runs():
    cmds = commands()
    assert len(cmds) >= 15, cmds  # parsing the script found the phases' commands
    text = SCRIPT.read_text()
    phases = set(re.findall(r"^phase_(\w+)\(\)", text, re.M))
    usage = re.search(r"usage: \$0 wheels \| \{([\w,]+)\}", text).group(1).split(",")
    assert set(usage) == phases


@pytest.mark.parametrize("argv", [c for c in commands() if c[:2] != ["-m", "pytest"]],
                         ids=lambda c: " ".join(c[:4]))
def test_each_benchmark_command_parses(argv, monkeypatch):
    from jds.models import PRESETS

    args = parse(argv, monkeypatch)
    model = getattr(args, "model", None)
    assert model is None or model in PRESETS, model


@pytest.mark.parametrize("argv", [c for c in commands() if c[:2] == ["-m", "pytest"]],
                         ids=lambda c: " ".join(c[2:6]))
def test_each_pytest_command_names_existing_tests(argv):
    files = [a for a in argv if a.startswith("tests/")]
    assert files
    names = set()
    for f in files:
        assert (ROOT / f).is_file(), f
        names |= set(re.findall(r"^def (test_\w+)", (ROOT / f).read_text(), re.M))
    if "-k" in argv:
        expr = argv[argv.index("-k") + 1]
        wanted = [t for t in re.split(r"\s+(?:or|and)\s+", expr) if not t.startswith("not ")]
        for term in wanted:
            assert any(term in n for n in names), (term, files)
