"""The README and docs/ stay true to the code: every relative link and image exists, every repository path named
in a code block exists, every `qig ...` command in a code block parses with qig's own argument parser, and the
README stays a front page (at most 250 lines)."""

import re
import shlex
from pathlib import Path

import pytest

from qig_plugin.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parent.parent
PAGES = [REPO_ROOT / "README.md", REPO_ROOT / "examples" / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"^```[a-z]*\n(.*?)^```", re.M | re.S)
REPO_PATH = re.compile(r"(?<![\w./-])((?:examples|scripts|benchmarks|docs|tests|qig_plugin)/[\w./-]*\w)")


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO_ROOT))


def commands(page: Path) -> list[list[str]]:
    """The shell words of every command in the page's code blocks (continuations joined, comments dropped,
    ``&&``/``;`` chains split)."""
    found = []
    for block in CODE_BLOCK.findall(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # not shell (Python, YAML)
                continue
            command: list[str] = []
            for word in [*words, "&&"]:
                if word in ("&&", ";", "||"):
                    if command:
                        found.append(command)
                    command = []
                else:
                    command.append(word)
    return found


def test_the_readme_is_a_front_page():
    assert len((REPO_ROOT / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_exist(page):
    missing = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^(https?:|mailto:|#)", target):
            continue
        if not (page.parent / target.split("#")[0]).exists():
            missing.append(target)
    assert not missing, f"{page_id(page)} links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_repository_paths_in_code_blocks_exist(page):
    named = {match for block in CODE_BLOCK.findall(page.read_text()) for match in REPO_PATH.findall(block)}
    missing = sorted(path for path in named if not (REPO_ROOT / path).exists()
                     and not path.startswith("docs/qig-explain"))  # an output path in an example command
    assert not missing, f"{page_id(page)} names missing paths: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_qig_commands_parse(page):
    parser = build_parser()
    qig_commands = [words for words in commands(page) if words[0] == "qig"]
    for words in qig_commands:
        own = words[1 : words.index("--")] if "--" in words else words[1:]  # after --: vLLM's options
        try:
            parser.parse_args(own)
        except SystemExit as error:
            pytest.fail(f"{page_id(page)}: `{shlex.join(words)}` does not parse (exit {error.code})")


def test_the_pages_show_every_qig_command():
    shown = {words[1] for page in PAGES for words in commands(page) if words[0] == "qig" and len(words) > 1}
    assert shown >= {"quantize", "eval", "explain", "generate", "serve", "plan-bits"}
