"""The commands the docs show must work with the code as it is (issue #30).

Every fenced shell block of README.md and docs/*.md is read; each `kandinsky-serve ...`
line is parsed by the CLI's own parser (serve.cli.build_parser), each `make ...` line is
checked against the Makefile's targets and variables, and each `python -m X` names a
module that exists. Inline code spans that name a `kandinsky-serve` subcommand or a
`make` target are checked too, and so are the docs' relative links and their anchors.
Each test reports every failure at once, as file:line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from serve.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}

FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
ANGLE_PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>")  # <your CUDA wheel index>, <key>
WORD_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")  # DIR, N, URL, PRIOR_DIR
ELISIONS = {"...", "…"}
SEPARATORS = {"|", "||", "&&", ";"}
DUMMY = "1"  # parses as a string, an int and a float alike


@dataclass
class Command:
    file: Path
    line: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(REPO)}:{self.line}"


class _ParseError(Exception):
    pass


def _raise_parse_error(parser: argparse.ArgumentParser, message: str):
    raise _ParseError(f"{parser.prog}: {message}")


# --- extraction ---------------------------------------------------------------------------


def _fenced_blocks(path: Path):
    """(language, [(line number, text), ...]) for every fenced block of a markdown file."""
    block, fence, lang = None, None, ""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = FENCE.match(line)
        if block is None:
            if match:
                block, fence, lang = [], match.group(1), match.group(2).lower()
        elif match and match.group(1).startswith(fence[0]) and len(match.group(1)) >= len(fence) and not match.group(2):
            yield lang, block
            block = None
        else:
            block.append((number, line))


def _join_continuations(lines):
    """Lines ending in a backslash continue on the next one: one (number, text) per command."""
    joined, start, parts = [], None, []
    for number, text in lines:
        if start is None:
            start = number
        if text.rstrip().endswith("\\"):
            parts.append(text.rstrip()[:-1])
            continue
        parts.append(text)
        joined.append((start, " ".join(part.strip() for part in parts)))
        start, parts = None, []
    if parts:
        joined.append((start, " ".join(part.strip() for part in parts)))
    return joined


def shell_commands() -> list[Command]:
    """Command lines of the shell blocks: with `$ ` prompts, only the prompted lines (the
    rest is output); unlabelled blocks count only when they have prompts."""
    commands = []
    for path in DOC_FILES:
        for lang, lines in _fenced_blocks(path):
            if lang not in SHELL_LANGS and lang != "":
                continue
            prompted = any(text.lstrip().startswith("$ ") for _, text in lines)
            if not prompted and lang not in SHELL_LANGS:
                continue
            picked, in_prompted = [], False
            for number, text in lines:
                stripped = text.strip()
                if prompted:
                    if stripped.startswith("$ "):
                        picked.append((number, stripped[2:]))
                        in_prompted = stripped.endswith("\\")
                    elif in_prompted:
                        picked.append((number, stripped))
                        in_prompted = stripped.endswith("\\")
                else:
                    picked.append((number, stripped))
            for number, text in _join_continuations(picked):
                if text and not text.startswith("#"):
                    commands.append(Command(path, number, text))
    return commands


def _outside_fences(path: Path) -> str:
    """The file's text with fenced blocks blanked (line numbers kept)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for _, block in _fenced_blocks(path):
        for number, _ in block:
            lines[number - 1] = ""
    # blank the fence lines themselves too
    return "\n".join("" if FENCE.match(line) else line for line in lines)


def inline_spans() -> list[Command]:
    spans = []
    for path in DOC_FILES:
        text = _outside_fences(path)
        for match in re.finditer(r"(?<!`)`([^`\n]+)`(?!`)", text):
            spans.append(Command(path, text.count("\n", 0, match.start()) + 1, match.group(1).strip()))
    return spans


# --- checks --------------------------------------------------------------------------------


def _split_comment(text: str) -> tuple[str, str]:
    """Split a shell line at its comment: a `#` starting a word, outside quotes."""
    quote = None
    for i, char in enumerate(text):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i], text[i + 1:].strip()
    return text, ""


def _segments(tokens: list[str]):
    """The simple commands of a pipeline or list, env assignments in front removed."""
    segment = []
    for token in tokens + ["|"]:
        if token in SEPARATORS:
            while segment and ENV_ASSIGNMENT.match(segment[0]):
                segment.pop(0)
            if segment:
                yield segment
            segment = []
        else:
            segment.append(token)


def _cli_args(tokens: list[str]) -> tuple[list[str], bool]:
    """Arguments with [optional] brackets opened, placeholders filled; and whether the
    line elides arguments (`...`)."""
    args, elided = [], False
    for token in tokens:
        bare = token.strip("[]")
        if bare in ELISIONS:
            elided = True
            continue
        if not bare:
            continue
        args.append(DUMMY if WORD_PLACEHOLDER.match(bare) else bare)
    return args, elided


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def _parse_cli(args: list[str], elided: bool) -> str | None:
    """None if the CLI's parser accepts args, else argparse's message."""
    parser = build_parser()
    for sub in _all_parsers(parser):
        sub.allow_abbrev = False  # the docs spell options out: `--worker` must not pass for `--workers`
        if elided:  # `train prior ... --workers 4`: the required options are the ones left out
            for action in sub._actions:
                if action.option_strings:
                    action.required = False
    with mock.patch.object(argparse.ArgumentParser, "error", _raise_parse_error), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            parser.parse_args(args)
        except _ParseError as error:
            return str(error)
        except SystemExit as exit_:  # --help, --version
            return None if exit_.code in (0, None) else f"exit {exit_.code}"
    return None


def _makefile() -> tuple[set[str], set[str]]:
    """The Makefile's targets (rules and .PHONY) and the variables it defines or uses."""
    text = (REPO / "Makefile").read_text()
    targets, variables = set(), set()
    for line in text.splitlines():
        if line.startswith(("\t", "#")) or not line.strip():
            continue
        rule = re.match(r"^([^:=#\s][^:=#]*?)\s*::?(?!=)(.*)$", line)
        if rule:
            names = rule.group(1).split()
            if names == [".PHONY"]:
                targets.update(rule.group(2).split())
            else:
                targets.update(names)
            continue
        assignment = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*[?:+!]?=", line)
        if assignment:
            variables.add(assignment.group(1))
    variables.update(re.findall(r"\$[({]([A-Za-z_][A-Za-z0-9_]*)[)}]", text))
    return targets, variables


def _check_make(args: list[str]) -> list[str]:
    targets, variables = _makefile()
    problems, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("-C", "-f", "-j", "-o", "-W"):
            skip = True
        elif arg.startswith("-"):
            continue
        elif ENV_ASSIGNMENT.match(arg):
            name = arg.split("=", 1)[0]
            if name not in variables:
                problems.append(f"variable {name} is not used by the Makefile")
        elif arg not in targets:
            problems.append(f"no target {arg!r} in the Makefile (targets: {', '.join(sorted(targets))})")
    return problems


def _check_module(args: list[str]) -> list[str]:
    if "-m" not in args or args.index("-m") + 1 >= len(args):
        return []
    module = args[args.index("-m") + 1]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return [] if found else [f"no module {module}"]


def _is_cli(program: str) -> bool:
    return Path(program).name == "kandinsky-serve"


def _is_python(program: str) -> bool:
    return re.fullmatch(r"python(3(\.\d+)?)?", Path(program).name) is not None


def check_command(command: Command, counts: dict[str, int]) -> list[str]:
    code, comment = _split_comment(command.text)
    try:
        tokens = shlex.split(ANGLE_PLACEHOLDER.sub(DUMMY, code))
    except ValueError as error:
        return [f"{command.where}: cannot split {command.text!r}: {error}"]
    problems = []
    for segment in _segments(tokens):
        program, rest = segment[0], segment[1:]
        if _is_cli(program):
            counts["cli"] += 1
            args, elided = _cli_args(rest)
            if comment.startswith("-"):  # `cmd   # --seed N, --threads 2`: options it also takes
                extra, extra_elided = _cli_args(shlex.split(ANGLE_PLACEHOLDER.sub(DUMMY, comment.replace(",", " "))))
                args, elided = args + extra, elided or extra_elided
            message = _parse_cli(args, elided)
            if message:
                problems.append(f"{command.where}: {command.text!r}: {message}")
        elif program == "make":
            counts["make"] += 1
            problems += [f"{command.where}: {command.text!r}: {p}" for p in _check_make(rest)]
        elif _is_python(program):
            problems += [f"{command.where}: {command.text!r}: {p}" for p in _check_module(rest)]
    return problems


def _check_cli_words(args: list[str]) -> str | None:
    """A command named in prose (`kandinsky-serve cluster local`, `... run --config FILE`):
    its subcommands exist and every option it shows is one the (sub)command takes."""
    parser = build_parser()
    for arg in args:
        if arg.startswith("-") and not re.fullmatch(r"-\d+(\.\d+)?", arg):
            option = arg.split("=", 1)[0]
            if option not in parser._option_string_actions:
                return f"{parser.prog} has no option {option}"
            continue
        choices = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not choices:
            continue  # a positional value
        if arg not in choices[0].choices:
            return f"{parser.prog} has no subcommand {arg!r} (has: {', '.join(choices[0].choices)})"
        parser = choices[0].choices[arg]
    return None


# --- tests ---------------------------------------------------------------------------------


def test_doc_files_are_found():
    assert (REPO / "README.md").exists()
    assert len(DOC_FILES) > 1, "docs/*.md missing"


def test_shell_blocks_in_docs_parse():
    commands = shell_commands()
    counts = {"cli": 0, "make": 0}
    problems = [problem for command in commands for problem in check_command(command, counts)]
    assert not problems, "documented commands that do not work:\n" + "\n".join(problems)
    # the extraction itself must keep finding the docs' commands
    assert counts["cli"] >= 5, counts
    assert counts["make"] >= 2, counts


def test_commands_named_in_prose_exist():
    problems, checked = [], 0
    for span in inline_spans():
        code, _ = _split_comment(span.text)
        try:
            tokens = shlex.split(ANGLE_PLACEHOLDER.sub(DUMMY, code))
        except ValueError:
            continue  # prose, not a command
        for segment in _segments(tokens):
            program, rest = segment[0], segment[1:]
            if any(token.endswith(":") for token in segment):
                continue  # output quoted in prose: `kandinsky-serve is up: http://...`
            if _is_cli(program):
                checked += 1
                message = _check_cli_words(_cli_args(rest)[0])
            elif program == "make" and rest:
                checked += 1
                message = "; ".join(_check_make(rest)) or None
            elif _is_python(program):
                message = "; ".join(_check_module(rest)) or None
            else:
                continue
            if message:
                problems.append(f"{span.where}: `{span.text}`: {message}")
    assert not problems, "commands named in the docs that do not exist:\n" + "\n".join(problems)
    assert checked >= 3


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, seen = set(), {}
    for line in _outside_fences(path).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_relative_links_and_anchors_resolve():
    problems = []
    for path in DOC_FILES:
        text = _outside_fences(path)
        for match in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
            target = match.group(1)
            if re.match(r"^[a-z]+:", target):
                continue  # http:, https:, mailto:
            where = f"{path.relative_to(REPO)}:{text.count(chr(10), 0, match.start()) + 1}"
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                problems.append(f"{where}: {target}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                problems.append(f"{where}: {target}: no heading with anchor #{anchor}")
    assert not problems, "broken links in the docs:\n" + "\n".join(problems)
