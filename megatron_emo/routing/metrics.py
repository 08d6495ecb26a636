"""Routing statistics accumulated on the device and read only when the trainer logs."""

import torch


class RoutingMetrics:
    """Sums of one router's losses and loads over the micro-batches since the last read.

    Plain tensors, not buffers, so mixed-precision wrappers never cast the counts to bf16.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self.lb_loss = self.z_loss = self.counts = self.pool_experts = None
        self.num_microbatches = 0

    def record(self, lb_loss, z_loss, counts, probs) -> None:
        """Add one micro-batch (losses detached; ``probs`` gives the mean pool size)."""
        pool_experts = (probs.detach() > 0).sum(dim=-1).float().mean()
        values = (lb_loss.detach(), z_loss.detach(), counts.detach(), pool_experts)
        if self.num_microbatches == 0:
            self.lb_loss, self.z_loss, self.counts, self.pool_experts = values
        else:
            self.lb_loss = self.lb_loss + values[0]
            self.z_loss = self.z_loss + values[1]
            self.counts = self.counts + values[2]
            self.pool_experts = self.pool_experts + values[3]
        self.num_microbatches += 1

    def read(self) -> dict:
        """Means over the recorded micro-batches as Python floats (one host sync), then reset.

        Keys: ``lb_loss``, ``z_loss``, ``pool_experts`` (means per micro-batch);
        ``load_max_over_mean`` (the busiest routed expert's share of this rank's top-k slots
        against an even share) and ``unused_experts`` (the fraction of routed experts that got no
        token), both from the counts summed over the micro-batches, i.e. over the whole step.
        """
        if self.num_microbatches == 0:
            return {}
        n = self.num_microbatches
        load = self.counts / self.counts.sum().clamp(min=1) * self.num_experts
        # The unused fraction comes from the summed counts inside the same stack: still one sync.
        unused = (self.counts == 0).float().mean()
        stats = torch.stack(
            [self.lb_loss / n, self.z_loss / n, load.max(), self.pool_experts / n, unused]
        ).tolist()
        self.reset()
        keys = ("lb_loss", "z_loss", "load_max_over_mean", "pool_experts", "unused_experts")
        return dict(zip(keys, stats))
