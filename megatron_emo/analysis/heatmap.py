"""Domain × expert heat maps of a usage matrix, experts ordered by clustering.

Each layer is one panel: a row per domain, a column per routed expert, the colour
``p(expert | domain)`` (the share of the domain's top-k selections). Experts are reordered per
layer by hierarchical clustering of their domain profiles (average linkage, optimal leaf order),
so experts that serve the same domains sit side by side and specialised experts show as blocks.
"""

import os

import torch
from scipy.cluster.hierarchy import leaves_list, linkage

from megatron_emo.analysis.specialisation import expert_given_domain
from megatron_emo.analysis.usage import ExpertUsage


def expert_order(selections: torch.Tensor) -> list[int]:
    """A clustering order of the experts (columns of ``[D, E]`` counts)."""
    profiles = expert_given_domain(selections.double()).T.numpy()  # [E, D]
    if profiles.shape[0] < 2:
        return list(range(profiles.shape[0]))
    return leaves_list(linkage(profiles, method="average", metric="euclidean", optimal_ordering=True)).tolist()


def plot_heatmaps(usage: ExpertUsage, path: os.PathLike, *, title: str = "") -> None:
    """Write one PNG with a heat map per layer (see the module docs)."""
    from matplotlib.figure import Figure  # no pyplot: no display backend needed

    num_layers, num_domains = usage.num_layers, len(usage.domains)
    figure = Figure(figsize=(min(3 + 0.12 * usage.num_experts, 20), 0.9 + num_layers * (0.35 * num_domains + 0.5)),
                    layout="constrained")
    axes = figure.subplots(num_layers, 1, squeeze=False)[:, 0]
    vmax = max(float(expert_given_domain(usage.selections[layer]).max()) for layer in range(num_layers))
    for layer, ax in enumerate(axes):
        selections = usage.selections[layer]
        order = expert_order(selections)
        image = ax.imshow(expert_given_domain(selections)[:, order].numpy(), aspect="auto", cmap="viridis",
                          vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_yticks(range(num_domains), usage.domains)
        ax.set_xticks([])
        ax.set_ylabel(f"layer {layer}")
    axes[-1].set_xlabel(f"{usage.num_experts} routed experts, ordered by clustering (per layer)")
    figure.colorbar(image, ax=list(axes), label="share of the domain's expert selections")
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=110)
