"""The docs cannot drift from the code: every `clv ...` command they show names subcommands and flags
the parser has, and every relative link (and its #anchor) points at something that exists.
In-process against `stream.cli.build_parser()`: no subprocess, no broker."""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from stream.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]*(?:\n[^`\n]*){0,3})`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
ENV_PREFIX = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+")  # `OMP_NUM_THREADS=2 clv ...`


def _commands(text: str) -> list[str]:
    """`clv ...` command lines of code blocks (a comment after `#` dropped) and inline code spans,
    environment assignments before the command dropped."""
    found = []
    for block in FENCE.findall(text):
        for line in block.splitlines()[1:-1]:
            line = ENV_PREFIX.sub("", line.strip().removeprefix("$ "))
            if line.startswith("clv "):
                found.append(line.split(" # ")[0].strip())
    for span in INLINE.findall(FENCE.sub("", text)):
        span = ENV_PREFIX.sub("", " ".join(span.split()))
        if span.startswith("clv ") and re.match(r"clv [a-z]", span):
            found.append(span)
    return found


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _tokens(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:  # an unclosed quote in a shortened example
        return command.split()


def _check(command: str, root: argparse.ArgumentParser) -> list[str]:
    """What in `command` the parser does not know (empty when every part is known)."""
    tokens = [t.strip("[]") for t in _tokens(command)[1:]]
    parsers = [root]
    problems = []
    while tokens and not tokens[0].startswith("-") and _subparsers(parsers[-1]):
        names = tokens.pop(0).split("|")
        choices = _subparsers(parsers[-1])
        problems += [f"no subcommand {n!r}" for n in names if n not in choices]
        if problems:
            return problems
        parsers.append(choices[names[0]])
    leaf = parsers[-1]
    positional = [a for a in leaf._actions if not a.option_strings and a.choices and a.dest != "help"]
    words = [t for t in tokens if t and not t.startswith("-")]
    if positional and words and words[0] not in ("...", "FILE"):
        problems += [f"{w!r} is not one of {sorted(positional[0].choices)}"
                     for w in words[0].split("|") if w not in positional[0].choices]
    known = {o for p in parsers for a in p._actions for o in a.option_strings}
    for token in tokens:
        if token.startswith("--"):
            flag = token.split("=")[0].rstrip(",.;:")
            if flag not in known:
                problems.append(f"no flag {flag}")
    return problems


def test_the_docs_show_clv_commands():
    assert sum(len(_commands(p.read_text())) for p in DOCS) > 60


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_clv_command_in_the_docs_is_known_to_the_parser(page: Path):
    parser = build_parser()
    wrong = {c: problems for c in _commands(page.read_text()) if (problems := _check(c, parser))}
    assert not wrong, wrong


def test_the_check_catches_a_misspelt_flag_and_an_unknown_subcommand():
    parser = build_parser()
    assert _check("clv query top --segmnet vip", parser) == ["no flag --segmnet"]
    assert _check("clv querry top", parser) == ["no subcommand 'querry'"]
    assert _check("clv query bottom", parser)
    assert _check("clv bench throughput|speed", parser) == ["no subcommand 'speed'"]
    assert not _check("clv query top --n 20 [--segment vip|high|...] [--json]", parser)
    assert _commands("`OMP_NUM_THREADS=2 clv evaluate FILE --seeds 42`") == ["clv evaluate FILE --seeds 42"]


def test_every_subcommand_answers_help(capsys):
    parser = build_parser()
    paths = [[name] for name in _subparsers(parser)]
    paths += [["bench", name] for name in _subparsers(_subparsers(parser)["bench"])]
    for path in paths:
        with pytest.raises(SystemExit) as stop:
            parser.parse_args([*path, "--help"])
        assert stop.value.code == 0, path
        assert f"usage: clv {' '.join(path)}" in capsys.readouterr().out


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(target)
    assert not broken, broken


def test_every_clv_variable_the_docs_name_is_a_settings():
    from stream.settings import Settings, env_names

    known = {env for name in Settings.model_fields for env in env_names(name)}
    named = {(str(p.relative_to(ROOT)), v) for p in DOCS for v in re.findall(r"\bCLV_[A-Z_]+\b", p.read_text())}
    assert named and not {(page, v) for page, v in named if v not in known}
