"""The READMEs and docs/*.md against the code, so that the guide cannot drift from it. Nothing runs: no
subprocess, no model.

- Every ``multitask ...`` command in a shell block (bash, sh, shell; in console blocks the ``$ `` lines) parses
  with the CLI's own parser (``build_parser``). The parser takes run directories and config paths as plain strings
  and checks no file, so a command's config (train, compare, validate) must also be a file of the repository or a
  YAML block of the docs that stands for it, and it is loaded with the command's ``--set`` overrides.
  ``compare --methods`` must name registered methods. Two shell idioms are read as a reader reads them:
  ``[--set seed=14]`` marks an optional part (the command is checked with and without it), and ``$K`` is expanded
  where the same block assigns ``K="..."``. Nothing else is substituted: ``runs/demo-…`` or ``$KEY`` reach the
  parser as written.
- Every YAML block loads with the project's loaders: an experiment (it has ``tasks``) with ``load_config`` into
  ``ExperimentConfig``, a task (it has ``type`` and ``data``) with ``load_task``. A block whose kind its keys do
  not tell says so in an HTML comment right above it (``<!-- docs-test: task -->`` or ``experiment``); a fragment
  meant as an excerpt says ``<!-- docs-test: excerpt -->`` and is skipped, and at most ``MAX_EXCERPTS`` are.
  A block whose first line is a comment naming a file (``# configs/reviews.yaml``) stands for that file: commands
  and other blocks may refer to it, and its relative paths start from that file's folder (else from ``configs/``,
  as shipped experiments' do). The task files an experiment names must resolve, and each is loaded with the
  entry's ``overrides``.
- Every Python block compiles, every ``make`` target in a shell block exists, every relative link (and its
  ``#anchor``, by GitHub's heading slugs) points at something in the repository, and every repository path quoted
  in prose (`multitask/...`, `bench/...`, `configs/...`) exists.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import io
import itertools
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from multitask.cli import build_parser
from multitask.config import load_config, load_yaml
from multitask.errors import ConfigError
from multitask.experiment import ExperimentConfig
from multitask.tasks.loading import load_task

REPO = Path(__file__).resolve().parents[1]
PAGES = [*sorted(REPO.glob("README*.md")), *sorted((REPO / "docs").rglob("*.md"))]  # README.md, README.zh-CN.md
MAX_EXCERPTS = 3  # YAML blocks the docs may mark as excerpts (not loaded)
SHELL = {"bash", "sh", "shell", "console"}
YAML = {"yaml", "yml"}
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<kind>[\w-]+)\s*-->\s*$")
MARKERS = {"excerpt", "task", "experiment"}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)\s*$")
NAMES_FILE = re.compile(r"^#\s*(?P<path>[\w./-]+\.ya?ml)\s*$")
CONTROL = {"&&", "||", "|", ";", "&"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
VARIABLE = re.compile(r"^\$(?:\{(?P<braced>\w+)\}|(?P<plain>\w+))$")
CONFIG_COMMANDS = {"train", "compare"}


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str  # dedented by the fence's indentation
    marker: str | None  # the docs-test marker right above the block

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def named_file(self) -> str | None:
        first = self.text.split("\n", 1)[0]
        match = NAMES_FILE.match(first)
        return match["path"] if match else None


@dataclass
class Command:
    where: str
    argv: list[str]


def closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= len(fence) and set(stripped) == {fence[0]}


def read_blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").split("\n")
    blocks, index = [], 0
    while index < len(lines):
        opened = FENCE.match(lines[index])
        if not opened:
            index += 1
            continue
        indent, fence = opened["indent"], opened["fence"]
        body, end = [], index + 1
        while end < len(lines) and not closes(lines[end], fence):
            body.append(lines[end][len(indent):] if lines[end].startswith(indent) else lines[end].lstrip())
            end += 1
        assert end < len(lines), f"{page.relative_to(REPO)}:{index + 1}: code block never closed"
        above = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        marker = MARKER.match(above)
        kind = marker["kind"] if marker else None
        blocks.append(Block(page, index + 1, opened["lang"].lower(), "\n".join(body), kind))
        index = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in read_blocks(page)]
NAMED: dict[str, list[Block]] = {}  # file -> the blocks that stand for it (a short and a long version may both)
for _block in BLOCKS:
    if _block.lang in YAML and _block.named_file:
        NAMED.setdefault(_block.named_file, []).append(_block)


# --------------------------------------------------------------------------- commands


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """(line, text) of each command line: backslash continuations joined; in console blocks only ``$`` lines."""
    found, pending, start = [], "", None
    for offset, line in enumerate(block.text.split("\n")):
        if block.lang == "console" and not pending:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if start is None:
            start = offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        found.append((block.line + 1 + start, pending + line))
        pending, start = "", None
    return found


def split_words(text: str) -> list[str] | None:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError:  # an unclosed quote: a line of a multi-line string (a curl body), not a command
        return None


def segments(words: list[str]) -> list[list[str]]:
    parts, current = [], []
    for word in words:
        if word in CONTROL:
            parts.append(current)
            current = []
        else:
            current.append(word)
    return [*parts, current]


def multitask_argv(words: list[str]) -> list[str] | None:
    """The arguments after the program, when these words run the multitask CLI (directly, or ``-m multitask``)."""
    for index, word in enumerate(words):
        direct = (word == "multitask" or word.endswith("/multitask")) and all(
            ASSIGNMENT.match(w) for w in words[:index])
        if direct or (word == "multitask" and index > 0 and words[index - 1] == "-m"):
            return words[index + 1:]
    return None


def optional_variants(where: str, argv: list[str]) -> list[list[str]]:
    """``[--set seed=14]`` is optional: the command with and without each bracketed part."""
    groups, index = [], 0
    pieces: list[list[str] | str] = []
    while index < len(argv):
        word = argv[index]
        if word.startswith("["):
            end = index
            while not argv[end].endswith("]"):
                end += 1
                assert end < len(argv), f"{where}: '[' without its ']' in {shlex.join(argv)}"
            group = argv[index:end + 1]
            group[0] = group[0][1:]
            group[-1] = group[-1][:-1]  # the same word as group[0] when the group is one word
            pieces.append([w for w in group if w])
            groups.append(len(pieces) - 1)
            index = end + 1
        else:
            pieces.append(word)
            index += 1
    variants = []
    for keep in itertools.product((False, True), repeat=len(groups)):
        chosen = dict(zip(groups, keep))
        argv_variant: list[str] = []
        for position, piece in enumerate(pieces):
            if isinstance(piece, list):
                argv_variant += piece if chosen[position] else []
            else:
                argv_variant.append(piece)
        variants.append(argv_variant)
    return variants


def expand(argv: list[str], variables: dict[str, str]) -> list[str]:
    expanded = []
    for word in argv:
        match = VARIABLE.match(word)
        name = match and (match["braced"] or match["plain"])
        expanded += shlex.split(variables[name]) if name in variables else [word]
    return expanded


def read_commands() -> tuple[list[Command], list[tuple[str, str]]]:
    commands, make_targets = [], []
    for block in BLOCKS:
        if block.lang not in SHELL:
            continue
        variables: dict[str, str] = {}
        for line, text in logical_lines(block):
            words = split_words(text)
            if not words:
                continue
            where = f"{block.page.relative_to(REPO)}:{line}"
            for segment in segments(words):
                if segment and all(ASSIGNMENT.match(w) for w in segment):  # K="--set ..." on a line of its own
                    variables.update(w.split("=", 1) for w in segment)
                    continue
                program = [w for w in segment if not ASSIGNMENT.match(w)]  # MULTITASK_DATA_ROOT=... make demo
                if program[:1] == ["make"]:
                    make_targets += [(where, target) for target in program[1:]]
                argv = multitask_argv(segment)
                if argv is not None:
                    for variant in optional_variants(where, expand(argv, variables)):
                        commands.append(Command(where, variant))
    return commands, make_targets


COMMANDS, MAKE_TARGETS = read_commands()


def parse(argv: list[str], where: str) -> argparse.Namespace:
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(argv)
    except SystemExit:
        message = errors.getvalue().strip().split("\n")[-1]  # argparse prints the usage, then the error
        pytest.fail(f"{where}: `multitask {shlex.join(argv)}` does not parse: {message}")


def block_file(block: Block, tmp_path: Path) -> Path:
    """The block's text in a file of its own, named as the file it stands for."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / Path(block.named_file or f"block-{block.line}.yaml").name
    path.write_text(block.text, encoding="utf-8")
    return path


def is_repo_file(path: str) -> bool:
    """A file of the repository: not outside it, and not an ignored output (runs/) that only this checkout has."""
    resolved = (REPO / path).resolve()
    if not (resolved.is_relative_to(REPO) and resolved.is_file()):
        return False
    relative = resolved.relative_to(REPO).as_posix()
    return not any(relative.startswith(ignored) if ignored.endswith("/") else relative == ignored
                   for ignored in ignored_paths())


@functools.cache
def ignored_paths() -> tuple[str, ...]:
    """What git ignores here (folders end in '/'); nothing where this is not a git checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard", "--directory"],
                                cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ()
    return tuple(line for line in listed.splitlines() if line)


def load_named(config: str, overrides: list[str], where: str, tmp_path: Path) -> None:
    """A config a command names: a file of the repository, or a block of the docs that stands for it."""
    if is_repo_file(config):
        paths = [REPO / config]
    elif config in NAMED:
        paths = [block_file(block, tmp_path / str(block.line)) for block in NAMED[config]]
    else:
        pytest.fail(f"{where}: {config} is neither a file of the repository nor a YAML block of the docs "
                    f"(a block names the file it stands for on its first line: '# {config}')")
    for path in paths:
        try:
            data, _ = load_yaml(path)
            if "tasks" in data:
                load_config(ExperimentConfig, path, overrides)
            else:
                assert not overrides, f"{where}: --set applies to experiments, not to the task file {config}"
                load_task(path)
        except ConfigError as error:
            pytest.fail(f"{where}: {config}{' with ' + ' '.join(overrides) if overrides else ''}: {error}")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.where)
def test_quoted_command_parses(command, tmp_path):
    args = parse(command.argv, command.where)
    if args.command in CONFIG_COMMANDS:
        load_named(args.config, args.set, command.where, tmp_path)
    elif args.command == "validate":
        for path in args.paths:
            load_named(path, args.set, command.where, tmp_path)


def statically_registered_methods() -> set[str]:
    """The method names multitask/compare.py registers, read from its source: importing it loads transformers,
    which takes seconds. Reads ``METHODS.register("name", ...)`` and f-strings over a ``for k in (1, 2, 3)`` loop;
    anything else is left to the import below."""
    tree = ast.parse((REPO / "multitask" / "compare.py").read_text(encoding="utf-8"))
    names: set[str] = set()

    def visit(node: ast.AST, env: list[dict[str, object]]) -> None:
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and isinstance(node.iter, ast.Tuple):
            values = [item.value for item in node.iter.elts if isinstance(item, ast.Constant)]
            env = [{**scope, node.target.id: value} for scope in env for value in values]
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "register"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "METHODS" and node.args):
            first = node.args[0]
            if isinstance(first, ast.Constant):
                names.add(first.value)
            elif isinstance(first, ast.JoinedStr):
                for scope in env:
                    try:
                        names.add(eval(compile(ast.Expression(first), "compare.py", "eval"), {}, dict(scope)))
                    except NameError:
                        pass
        for child in ast.iter_child_nodes(node):
            visit(child, env)

    visit(tree, [{}])
    return names


def test_compare_methods_are_registered():
    quoted = [c for c in COMMANDS if c.argv[:1] == ["compare"]]
    assert quoted, "no `multitask compare` command found in the docs"
    wanted = {}
    for command in quoted:
        args = parse(command.argv, command.where)
        for method in (m.strip() for m in args.methods.split(",")):
            if method:
                wanted.setdefault(method, command.where)
    unknown = set(wanted) - statically_registered_methods()
    if unknown:  # registered some other way, or not at all: ask the registry itself
        from multitask.compare import METHODS

        unknown = {method for method in unknown if method not in METHODS}
    assert not unknown, "\n".join(f"{wanted[m]}: --methods names {m!r}, which is not a registered method"
                                  for m in sorted(unknown))


def test_make_targets_exist():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"(?m)^([\w.-]+)\s*:(?!=)", makefile))
    assert {"demo", "test"} <= {target for _, target in MAKE_TARGETS}, "the README's two commands are gone"
    for where, target in MAKE_TARGETS:
        assert target in targets, f"{where}: `make {target}`: the Makefile has {', '.join(sorted(targets))}"


# --------------------------------------------------------------------------- YAML blocks

YAML_BLOCKS = [block for block in BLOCKS if block.lang in YAML]
LOADED = [block for block in YAML_BLOCKS if block.marker != "excerpt"]


def resolve_task_file(entry_file: str, block: Block, where: str) -> tuple[Path | None, list[Block]]:
    """As the CLI does (beside the experiment first, then from the working directory), over repo files and the
    docs' named blocks."""
    home = Path(block.named_file).parent if block.named_file else Path("configs")
    for candidate in (home / entry_file, Path(entry_file)):
        parts = _normalised(candidate.parts)
        if parts is None:
            continue
        relative = Path(*parts)
        if is_repo_file(str(relative)):
            return REPO / relative, []
        if str(relative) in NAMED:
            return None, NAMED[str(relative)]
    pytest.fail(f"{where}: task file {entry_file} resolves to nothing in the repository or the docs "
                f"(looked beside {home}/ and from the repository root)")


def _normalised(parts: tuple[str, ...]) -> list[str] | None:
    """The path's parts with '.' and '..' resolved; None when it leaves the repository."""
    kept: list[str] = []
    for part in parts:
        if part == "..":
            if not kept:
                return None
            kept.pop()
        elif part != ".":
            kept.append(part)
    return kept


def kind_of(block: Block, data: dict) -> str:
    if block.marker in ("task", "experiment"):
        return block.marker
    if "tasks" in data:
        return "experiment"
    if "type" in data and "data" in data:
        return "task"
    pytest.fail(f"{block.where}: a YAML block that is neither an experiment (no 'tasks') nor a task ('type' and "
                f"'data'): complete it, or mark it with <!-- docs-test: excerpt --> right above it")


@pytest.mark.parametrize("block", LOADED, ids=lambda b: b.where)
def test_yaml_block_loads(block, tmp_path):
    assert block.marker is None or block.marker in MARKERS, f"{block.where}: unknown marker {block.marker!r}"
    if block.named_file and is_repo_file(block.named_file):
        assert block.text.strip() == (REPO / block.named_file).read_text(encoding="utf-8").strip(), (
            f"{block.where}: the block names {block.named_file}, a file of the repository, but differs from it")
    path = block_file(block, tmp_path)
    try:
        data, _ = load_yaml(path)
        if kind_of(block, data) == "task":
            load_task(path)
            return
        experiment = load_config(ExperimentConfig, path)
        for number, entry in enumerate(experiment.tasks):
            task_path, task_blocks = resolve_task_file(entry.file, block, f"{block.where}: tasks.{number}")
            for task_file in [task_path] if task_path else [block_file(b, tmp_path / str(b.line)) for b in task_blocks]:
                load_task(task_file, entry.overrides)
    except ConfigError as error:
        pytest.fail(f"{block.where}: {str(error).replace(str(path), 'the block')}")


def test_few_yaml_blocks_are_skipped():
    skipped = [block.where for block in YAML_BLOCKS if block.marker == "excerpt"]
    assert len(skipped) <= MAX_EXCERPTS, f"{len(skipped)} YAML blocks are marked as excerpts: {skipped}"
    assert len(LOADED) >= 10 and len(COMMANDS) >= 40, "the docs' blocks were not found: is the collector broken?"


def test_markers_sit_above_blocks():
    marked = {(block.page, block.line) for block in BLOCKS if block.marker}
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").split("\n")
        for number, line in enumerate(lines, start=1):
            if "docs-test" in line:
                where = f"{page.relative_to(REPO)}:{number}"
                kind = MARKER.match(line)
                assert kind and kind["kind"] in MARKERS, f"{where}: unknown marker {line.strip()}"
                following = next(n for n in range(number, len(lines)) if lines[n].strip()) + 1
                assert (page, following) in marked, f"{where}: a marker with no code block below"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "python"], ids=lambda b: b.where)
def test_python_block_compiles(block):
    compile(block.text, block.where, "exec")


# --------------------------------------------------------------------------- links

LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(?P<text>.+?)\s*#*\s*$")


def prose(page: Path) -> list[str]:
    """The page's lines with code blocks blanked and inline code removed."""
    lines = page.read_text(encoding="utf-8").split("\n")
    for block in (b for b in BLOCKS if b.page == page):
        for index in range(block.line - 1, block.line + block.text.count("\n") + 2):
            lines[index] = ""
    return [re.sub(r"`[^`]*`", "", line) for line in lines]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


@functools.cache
def anchors(page: Path) -> set[str]:
    lines = page.read_text(encoding="utf-8").split("\n")
    for block in (b for b in BLOCKS if b.page == page):
        for index in range(block.line - 1, block.line + block.text.count("\n") + 2):
            lines[index] = ""
    found, seen = set(), {}
    for line in lines:
        match = HEADING.match(line)
        if match:
            base = slug(match["text"])
            count = seen.get(base, 0)
            found.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    problems = []
    for number, line in enumerate(prose(page), start=1):
        for link in LINK.finditer(line):
            target = link["target"]
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            path_text, _, anchor = target.partition("#")
            path = (page.parent / path_text).resolve() if path_text else page
            where = f"{page.relative_to(REPO)}:{number}: [{link['text']}]({target})"
            if not path.is_relative_to(REPO) or not path.exists():
                problems.append(f"{where}: no such file in the repository")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                problems.append(f"{where}: no heading with that anchor in {path.relative_to(REPO)}")
    assert not problems, "\n".join(problems)


QUOTED_PATH = re.compile(r"`(?P<path>(?:multitask|bench|configs|tasks|tests|docs)/[\w./-]+)`")
PATH_PAGES = [page for page in PAGES if page.name != "README.zh-CN.md"]  # its examples name no file (yet)


@pytest.mark.parametrize("page", PATH_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_quoted_repository_paths_exist(page):
    """A module, script, config or test named in prose (`multitask/tasks/multilabel.py`, `bench/serve_load.py`)
    exists, or is a file a YAML block of the docs stands for: modules move, and the docs must follow."""
    problems = []
    for number, line in enumerate(page.read_text(encoding="utf-8").split("\n"), start=1):
        for quoted in QUOTED_PATH.finditer(line):
            path = quoted["path"].rstrip(".")
            if not (REPO / path).exists() and path not in NAMED:
                problems.append(f"{page.relative_to(REPO)}:{number}: `{path}` is not in the repository")
    assert not problems, "\n".join(problems)
