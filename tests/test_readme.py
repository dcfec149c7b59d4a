"""Every command the READMEs give parses with its script's own command line, read out of the READMEs themselves."""

import os
import re
import shlex

import pytest
import tyro

from conftest import ROOT, load_module

READMES = ["README.md", "benchmark/README.md", "data/README.md"]
SCRIPTS = {"cql_mt_noshare.py", "cql_mt_shareall.py", "cql_mt_cds.py", "brac_mt_cds.py", "hcsac.py",
           "collect_datasets.py", "collect_maze.py", "collect_door_drawer.py", "benchmark/run.py",
           "benchmark/speed.py"}  # fmt: skip


def readme_commands():
    """(readme, command) for each `python <script> ...` line of a bash block and each inline `python ...` span."""
    found = []
    for readme in READMES:
        text = open(os.path.join(ROOT, readme)).read()
        lines = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]
        lines += re.findall(r"`(python [^`]+)`", text)
        found += [(readme, line.strip()) for line in lines if re.match(r"python (?!-m )", line.strip())]
    return found


COMMANDS = readme_commands()


def test_the_readmes_give_commands_and_the_quickstart_comes_first():
    assert len(COMMANDS) >= 10
    first_training = next(cmd for readme, cmd in COMMANDS if readme == "README.md" and "--total-steps" in cmd)
    assert first_training.startswith("python cql_mt_cds.py ") and "--exp-name quickstart" in first_training


@pytest.mark.parametrize("readme, command", COMMANDS, ids=[f"{r}: {c[:60]}" for r, c in COMMANDS])
def test_every_readme_command_parses_with_its_own_cli(readme, command):
    words = shlex.split(command.split(" #")[0])  # a trailing shell comment is not part of the command
    script = words[1]
    assert script in SCRIPTS, f"{readme}: unknown script in {command!r}"
    name = os.path.splitext(script)[0].replace("/", "_")
    module = load_module(name, os.path.join(ROOT, script))
    try:
        tyro.cli(module.Args, args=[w for w in words[2:] if w != "--help"])
    except SystemExit as e:
        pytest.fail(f"{readme}: {command!r} does not parse (exit {e.code})")


@pytest.mark.parametrize("script", ["cql_mt_noshare", "cql_mt_shareall", "cql_mt_cds", "brac_mt_cds", "hcsac"])
def test_every_flag_has_its_help_and_names_no_internal_source(script):
    """--help is a reference card: each field says what it does in at most two short lines, and cites papers or the
    HCSAC slides, never the project's internal file names."""
    source = open(os.path.join(ROOT, script + ".py")).read()
    args = source[source.index("class Args:") : source.index("\n\n\n", source.index("class Args:"))]
    fields = re.findall(r"^    (\w+): [^=]+= .*$", args, re.M)
    for name in fields:
        line = re.search(rf"^    {name}: [^\n]*(?:\n    \"\"\"(.*?)\"\"\")?", args, re.M | re.S)
        inline = "  # " in line.group(0).splitlines()[0]
        docstring = line.group(1)
        assert inline or docstring, f"{script}.{name} has no help"
        if docstring:
            assert len(docstring.splitlines()) <= 2, f"{script}.{name}: help over two lines"
    assert not re.search(r"seed 00\d", args), script


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_no_help_shows_an_empty_default(script, capsys, monkeypatch):
    """An empty default says what it stands for (`(default: all of the domain's)`), never `(default: '')`."""
    monkeypatch.setenv("COLUMNS", "200")
    module = load_module(os.path.splitext(script)[0].replace("/", "_"), os.path.join(ROOT, script))
    with pytest.raises(SystemExit):
        tyro.cli(module.Args, args=["--help"])
    text = capsys.readouterr().out
    assert text.count("(default: ") >= 3, text[:500]  # the help was rendered
    assert not re.search(r"\(default: (''|\(\)|)\)", text), re.findall(r".*\(default: (?:''|\(\)|)\).*", text)
