"""A small real-text corpus that every Python installation carries: Python's documentation.

Documents are the help topics of the language reference (``pydoc_data.topics``) and the
docstrings of a fixed list of standard-library modules, their classes and functions. The list
is fixed and the order sorted, so the corpus is the same on every machine with the same Python.
"""

import importlib
import inspect

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

MIN_DOCUMENT_CHARS = 200


def _module_docstrings(module_name: str):
    module = importlib.import_module(module_name)
    yield inspect.getdoc(module)
    for name, member in sorted(vars(module).items()):
        if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(member) or inspect.isfunction(member):
            yield inspect.getdoc(member)


def python_docs() -> list[str]:
    """The corpus as a list of documents (plain text, one document per entry)."""
    from pydoc_data.topics import topics

    documents = [topics[key] for key in sorted(topics)]
    for module_name in STDLIB_MODULES:
        documents.extend(_module_docstrings(module_name))
    return [doc.strip() for doc in documents if doc and len(doc.strip()) >= MIN_DOCUMENT_CHARS]
