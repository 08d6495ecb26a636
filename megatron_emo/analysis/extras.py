"""The optional packages of the command-line tools (setup.py's extras), checked before use."""

import importlib.util
import sys

EXIT_NOT_INSTALLED = 2
"""The status argparse exits with on a usage error, as the tools do on bad input."""


def exit_unless_installed(extra: str, *modules: str) -> None:
    """Exit, as argparse does on a usage error (one line on stderr, status 2), unless every one
    of ``modules`` is installed; the line names the pip command of setup.py's ``extra``."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        print(f'error: this tool needs {", ".join(missing)}, not installed: pip install -e ".[{extra}]"',
              file=sys.stderr)
        raise SystemExit(EXIT_NOT_INSTALLED)
