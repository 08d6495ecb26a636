"""DocumentPooledRouter: fp32 router logits, document pools, top-k, and the router losses.

    hidden [s, b, h] --W (fp32)--> logits [s*b, E] --rows first--> route(segments, pools)
    --> weights, indices [s*b, K]   (+ LB and z-loss attached to the weights' backward)

The segments and the training pools come with the micro-batch, computed once for every layer
(:class:`megatron_emo.model.document_batch.DocumentBatch`); a layer selects its row of pools.

A clean module rather than a megatron-core ``Router`` subclass: in megatron-core 0.16.1
``Router.gating`` moves its weight to CUDA and calls a TransformerEngine-only GEMM, and
``TopKRouter`` renormalises and computes its losses on unmasked scores, none of which EMO wants.
The losses reach backward through megatron-core's ``MoEAuxLossAutoScaler``, whose scale
megatron-core's pipeline schedules set per micro-batch.
``route`` is :func:`megatron_emo.kernels.routing.route`: the fused Triton kernels on CUDA, the
PyTorch reference on CPU (it logs which).
"""

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_emo.config import EmoConfig
from megatron_emo.kernels.routing import route
from megatron_emo.kernels.routing.reference import at_least_fp32
from megatron_emo.routing.balance import load_balancing_loss, z_loss
from megatron_emo.routing.metrics import RoutingMetrics


class DocumentPooledRouter(MegatronModule):
    """Routes every token to ``routed_topk`` experts inside its document's pool.

    Pools: in training a size hashed from (document id, layer), uniform on
    [emo_pool_min, emo_pool_max] (the micro-batch's pool table,
    :class:`megatron_emo.routing.documents.TrainingPools`); in eval the fixed
    ``emo_eval_pool`` (None: no pool); none at all in ``topk`` mode.
    """

    def __init__(self, config: EmoConfig):
        super().__init__(config)
        self.weight = torch.nn.Parameter(
            torch.empty(config.num_routed_experts, config.hidden_size, dtype=torch.float32)
        )
        if config.perform_initialization:
            # EMO draws the router from a normal truncated at three standard deviations.
            std = config.init_method_std
            torch.nn.init.trunc_normal_(self.weight, std=std, a=-3 * std, b=3 * std)
        # Under sequence parallelism each TP rank's logits come from its own sequence shard:
        # the gradient must be summed over TP.
        self.weight.sequence_parallel = config.sequence_parallel
        self.layer_number = 1
        self.metrics = RoutingMetrics(config.num_routed_experts)

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def pool_sizes(self, segment_ids: torch.Tensor, training_pools: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """This layer's pool of every segment (int64, indexed by segment), or None for no pool."""
        config = self.config
        if config.emo_router_mode == "topk":
            return None
        if self.training:
            if training_pools is None or training_pools.shape[0] != config.num_layers:
                carried = ("no pool table" if training_pools is None
                           else f"a pool table for num_layers={training_pools.shape[0]}")
                raise ValueError(
                    f"layer {self.layer_number} of {config.num_layers} trains with pools but the micro-batch "
                    f"carries {carried}: build its DocumentBatch with pools=TrainingPools.of(the model config)"
                )
            return training_pools[self.layer_number - 1]
        if config.emo_eval_pool is None:
            return None
        # Indexed by segment; the segment count is at most the token count.
        return torch.full_like(segment_ids, config.emo_eval_pool)

    def forward(self, hidden_states: torch.Tensor, segment_ids: torch.Tensor,
                training_pools: Optional[torch.Tensor] = None):
        """Route a micro-batch.

        Args:
            hidden_states: ``[s, b, h]`` post-norm MoE input (``[s/TP, b, h]`` under sequence
                parallelism).
            segment_ids: int64 ``[b*s]``, rows flattened: each token's router segment
                (:attr:`DocumentBatch.segment_ids <megatron_emo.model.document_batch.DocumentBatch>`).
            training_pools: int64 ``[num_layers, N]``, every layer's training pool of each
                segment (:meth:`megatron_emo.routing.documents.TrainingPools.table`); needed
                in training unless the mode is ``topk``.

        Returns:
            ``(weights, indices)``: fp32 and int64 ``[s*b, K]`` for the whole sequence, in
            sequence-major token order.
        """
        config = self.config
        # fp32 logits whatever the activation dtype (the weight may be bf16 under Float16Module).
        logits = torch.matmul(at_least_fp32(hidden_states), at_least_fp32(self.weight).t())
        if config.sequence_parallel:
            # Documents cross the sequence shards: route the whole sequence on every TP rank
            # (identical pools and LB statistics); each rank's backward keeps its own shard.
            logits = gather_from_sequence_parallel_region(logits, tensor_parallel_output_grad=False)
        seq_len, batch, _ = logits.shape
        # Segments are contiguous along rows, so route in row-major ([b, s]) token order.
        logits = logits.transpose(0, 1).reshape(batch * seq_len, -1)
        pool_sizes = self.pool_sizes(segment_ids, training_pools)
        weights, indices, probs, logsumexp = route(
            logits, segment_ids, pool_sizes, config.routed_topk, return_logsumexp=True
        )
        if self.training and torch.is_grad_enabled():
            lb_loss, counts = load_balancing_loss(probs, indices, group=self.balance_group())
            router_z_loss = z_loss(logsumexp)
            aux_loss = (
                config.emo_lb_loss_weight * lb_loss + config.emo_z_loss_weight * router_z_loss
            ) / config.num_layers
            weights = MoEAuxLossAutoScaler.apply(weights, aux_loss)
            self.metrics.record(lb_loss, router_z_loss, counts, probs)
        # Back to the sequence-major order megatron-core's activations use.
        weights = weights.view(batch, seq_len, -1).transpose(0, 1).reshape(seq_len * batch, -1)
        indices = indices.view(batch, seq_len, -1).transpose(0, 1).reshape(seq_len * batch, -1)
        return weights, indices

    @staticmethod
    def balance_group():
        """Ranks holding other tokens of the same micro-batch: data- and context-parallel (the
        router sees every token of its data-parallel rank, sequence-parallel or not)."""
        if not parallel_state.model_parallel_is_initialized():
            return None
        return parallel_state.get_data_parallel_group(with_context_parallel=True)
