"""Failure handling around the training steps: preemption signals, non-finite steps, spikes."""

import logging
import signal

import torch

from megatron_emo.parallel.shards import chunks_of, parameter_shards

logger = logging.getLogger(__name__)


class StopSignal:
    """Remembers SIGTERM/SIGUSR1 (how SLURM preempts) so the loop can stop at a step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFiniteStep(RuntimeError):
    """The run stopped on a non-finite loss or gradient; the message says where."""


def non_finite_gradients(model, limit: int = 8) -> list[str]:
    """Names of parameters whose gradient has NaN or Inf entries (the first ``limit``);
    ``model``: a module or this rank's list of pipeline chunks."""
    names = []
    for param, spec in parameter_shards(model, chunks_of(model)[0].config):
        name = spec.full_name
        grad = getattr(param, "main_grad", None)
        grad = param.grad if grad is None else grad
        if grad is not None and not torch.isfinite(grad).all():
            names.append(name)
            if len(names) == limit:
                break
    return names


class NonFiniteGuard:
    """Skip steps with a non-finite loss or gradient norm, up to ``max_skips`` in a row.

    With ``policy="skip"`` a bad step is skipped (no update) and training goes on; with
    ``"stop"``, or after more than ``max_skips`` bad steps in a row, :meth:`bad_step` raises
    :class:`NonFiniteStep` naming the step and the parameters with non-finite gradients.
    """

    def __init__(self, policy: str, max_skips: int):
        self.policy, self.max_skips, self.bad_in_a_row = policy, max_skips, 0

    def good_step(self) -> None:
        self.bad_in_a_row = 0

    def bad_step(self, step: int, loss: float, grad_norm: float, model) -> None:
        self.bad_in_a_row += 1
        bad = non_finite_gradients(model)
        message = (f"step {step + 1}: loss {loss}, gradient norm {grad_norm}; non-finite gradients "
                   f"in {bad or 'no parameter'}")
        if self.policy == "stop" or self.bad_in_a_row > self.max_skips:
            raise NonFiniteStep(f"{message} ({self.bad_in_a_row} bad steps in a row)")
        logger.warning("skipped %s", message)


class SpikeDetector:
    """Logs a warning when the loss exceeds ``factor`` times its running mean."""

    def __init__(self, factor: float, decay: float = 0.95):
        self.factor, self.decay, self.mean = factor, decay, None

    def observe(self, step: int, loss: float) -> None:
        if self.mean is not None and loss > self.factor * self.mean:
            logger.warning("loss spike at step %d: %.4g, running mean %.4g", step, loss, self.mean)
        self.mean = loss if self.mean is None else self.decay * self.mean + (1 - self.decay) * loss
