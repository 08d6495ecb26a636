"""Logging helpers: messages logged once per process, and the command-line tools' setup."""

import logging
import warnings

_logged_once = set()


def log_once(logger: logging.Logger, message: str, *args) -> None:
    """``logger.info(message, *args)`` the first time this exact message comes."""
    key = (logger.name, message, args)
    if key not in _logged_once:
        _logged_once.add(key)
        logger.info(message, *args)


def quiet_megatron_warnings() -> None:
    """Silence megatron-core's import-time warnings about what we do not use: TransformerEngine,
    apex, and its cuda-graph default. Call before megatron-core is imported."""
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed")
    warnings.filterwarnings("ignore", message="full scope is deprecated")


def configure_cli_logging() -> None:
    """Timestamped INFO lines on stderr, without megatron-core's per-layer notice that it does
    not know our MLP class."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(
        lambda record: "Unknown MLP type" not in record.getMessage()
    )
