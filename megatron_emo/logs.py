"""Logging helpers: messages logged once per process, and the command-line tools' setup (our
INFO lines and the warnings that matter by default, megatron-core's chatter with ``--verbose``)."""

import argparse
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


MEGATRON_LOGGER = "megatron.core"
"""The parent of every megatron-core module's logger."""

NOT_APPLICABLE_WARNINGS = (
    # EmoConfig leaves moe_router_dtype unset, but the DocumentPooledRouter computes in fp32.
    (r"Using a large number of experts \(e\.g\. >=32\) without fp32 routing", UserWarning,
     r"megatron\.core\.transformer\.transformer_config"),
    # Every checkpoint load: megatron-core calls torch's old name; nothing for a user to change.
    (r"`load_state_dict` is deprecated", FutureWarning, r"megatron\.core\.dist_checkpointing\.strategies\.torch"),
)
"""megatron-core's warnings that do not apply to megatron_emo: (message, category, module)."""

NOT_APPLICABLE_LOGS = {
    # Once per layer: megatron-core does not know our MLP class and builds it with the default
    # arguments, which is what it needs.
    f"{MEGATRON_LOGGER}.transformer.transformer_layer": "Unknown MLP type",
    # Twice per domain: each validation set is one dataset (as is a one-dataset blend); harmless.
    f"{MEGATRON_LOGGER}.datasets.blended_dataset": "Building a BlendedDataset for a single MegatronDataset",
}
"""megatron-core's logged warnings that do not apply to megatron_emo: logger → message start."""


def _applies(record: logging.LogRecord) -> bool:
    # A filter of each logger of NOT_APPLICABLE_LOGS: sees only that logger's own records.
    return not record.getMessage().startswith(NOT_APPLICABLE_LOGS[record.name])


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbose``, for :func:`configure_cli_logging`."""
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show megatron-core's INFO logging and every warning")


def configure_cli_logging(verbose: bool = False) -> None:
    """Timestamped INFO lines on stderr: ours, and megatron-core's warnings and errors. Shown
    only when ``verbose``: megatron-core's INFO chatter (dataset index building, GPTDatasetConfig
    dumps, Megatron-FSDP detection, the LR schedule), its warnings that do not apply to
    megatron_emo (:data:`NOT_APPLICABLE_LOGS`, :data:`NOT_APPLICABLE_WARNINGS`, those of
    :func:`quiet_megatron_warnings`) and every other warning Python hides by default; but not
    the import-time warnings of a megatron-core imported before the arguments are parsed, which
    the tool's :func:`quiet_megatron_warnings` already hid."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    noisy = [logging.getLogger(name) for name in NOT_APPLICABLE_LOGS]
    if verbose:
        logging.getLogger(MEGATRON_LOGGER).setLevel(logging.NOTSET)
        for logger in noisy:
            logger.removeFilter(_applies)
        warnings.simplefilter("default")
        return
    logging.getLogger(MEGATRON_LOGGER).setLevel(logging.WARNING)
    for logger in noisy:
        logger.addFilter(_applies)
    quiet_megatron_warnings()
    for message, category, module in NOT_APPLICABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
