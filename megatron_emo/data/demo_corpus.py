"""The demo corpus: real text in three domains that every installation has offline.

- ``code``: Python source files of the standard library (this interpreter's), one per document;
- ``docs``: Python's documentation: the language-reference help topics (``pydoc_data``) and the
  docstrings of a fixed list of standard-library modules, their classes and functions;
- ``prose``: *Botchan* by Natsume Sōseki (English translation, 1918, Project Gutenberg eBook
  #8868, public domain; shipped in ``megatron_emo/data/demo/botchan.txt`` with its Project
  Gutenberg licence), cut into passages at line ends.

Lists are sorted and capped, so the corpus is the same on every machine with the same Python.
"""

import importlib
import inspect
import os
import sysconfig
from pathlib import Path

DOMAINS = ("code", "docs", "prose")

MIN_DOCUMENT_CHARS = 200
CODE_FILE_BYTES = (1_000, 16_000)
"""Source files in this size range only: many mid-sized documents rather than a few huge ones."""
CODE_TOTAL_BYTES = 700_000
PROSE_PASSAGE_CHARS = 2_000
BOTCHAN = Path(__file__).parent / "demo" / "botchan.txt"
_SKIPPED_STDLIB_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__",
                        "ensurepip", "turtledemo", "lib2to3", "tkinter", "venv"}

STDLIB_MODULES = (
    "abc argparse array ast asyncio base64 bisect calendar cmath codecs collections "
    "colorsys configparser contextlib copy csv dataclasses datetime decimal difflib dis "
    "email enum fnmatch fractions functools gettext glob gzip hashlib heapq hmac html "
    "http.client inspect io ipaddress itertools json locale logging lzma mailbox math "
    "mimetypes numbers operator os pathlib pickle pprint queue random re reprlib sched "
    "secrets shelve shutil socket sqlite3 statistics string struct subprocess tarfile "
    "tempfile textwrap threading tokenize types typing unittest urllib.parse uuid wave "
    "weakref zipfile zlib"
).split()


def _module_docstrings(module_name: str):
    module = importlib.import_module(module_name)
    yield inspect.getdoc(module)
    for name, member in sorted(vars(module).items()):
        if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(member) or inspect.isfunction(member):
            yield inspect.getdoc(member)


def docs_documents() -> list[str]:
    from pydoc_data.topics import topics

    documents = [topics[key] for key in sorted(topics)]
    for module_name in STDLIB_MODULES:
        documents.extend(_module_docstrings(module_name))
    return [doc.strip() for doc in documents if doc and len(doc.strip()) >= MIN_DOCUMENT_CHARS]


def code_documents() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_STDLIB_DIRS)
        paths.extend(Path(root) / name for name in sorted(files) if name.endswith(".py"))
    documents, total = [], 0
    for path in sorted(paths):
        low, high = CODE_FILE_BYTES
        if not low <= path.stat().st_size <= high:
            continue
        try:
            documents.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
        total += len(documents[-1])
        if total >= CODE_TOTAL_BYTES:
            break
    return documents


def prose_documents() -> list[str]:
    text = BOTCHAN.read_text(encoding="utf-8-sig")
    body = text.split("*** START OF THIS PROJECT GUTENBERG EBOOK")[1].split("End of Project Gutenberg's")[0]
    # Drop the rest of the START marker line and the transcribers' credit line.
    lines = [line for line in body.splitlines()[1:] if not line.startswith("Produced by")]
    passages, current = [], []
    for line in lines:
        current.append(line)
        if sum(len(part) + 1 for part in current) >= PROSE_PASSAGE_CHARS:
            passages.append("\n".join(current).strip())
            current = []
    passages.append("\n".join(current).strip())
    return [passage for passage in passages if len(passage) >= MIN_DOCUMENT_CHARS]


def demo_documents() -> dict[str, list[str]]:
    """The corpus: documents (plain text) per domain, in :data:`DOMAINS` order."""
    return {"code": code_documents(), "docs": docs_documents(), "prose": prose_documents()}
