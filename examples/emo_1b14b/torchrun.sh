#!/usr/bin/env bash
# Start one node's share of a layout (layouts.sh) with torchrun, 8 GPUs per node.
#
#   bash examples/emo_1b14b/torchrun.sh 8                                  # one node
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/emo_1b14b/torchrun.sh 16   # node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash examples/emo_1b14b/torchrun.sh 16   # node1
#   RECIPE=stdmoe_1b14b bash examples/emo_1b14b/torchrun.sh 8              # standard-MoE baseline
#
# Arguments after the layout go to megatron_emo.train; a flagship run needs its data, e.g.
#   --set "data.blend=[[1.0,'/data/dolma']]" --set data.tokenizer_model="'/data/tokenizer.model'"
# (without data.blend a run of more than 100M tokens on the demo corpus is refused at start).
# Environment: RECIPE (emo_1b14b), GPUS_PER_NODE (8), NNODES (GPUs / 8), NODE_RANK (0),
# MASTER_ADDR (localhost), MASTER_PORT (29500).
set -euo pipefail
source "$(dirname "$0")/layouts.sh"
layout=${1:?usage: torchrun.sh LAYOUT [megatron_emo.train arguments...]}
shift
overrides=$(layout_overrides "$layout")
recipe=${RECIPE:-emo_1b14b}
gpus=${GPUS_PER_NODE:-8}
world=${layout%%-*}
nnodes=${NNODES:-$((world / gpus))}
if (( nnodes * gpus != world )); then
    echo "layout $layout needs $world GPUs; NNODES x GPUS_PER_NODE gives $((nnodes * gpus))" >&2
    exit 2
fi
# $overrides is a list of words without spaces inside them: split it.
# shellcheck disable=SC2086
exec torchrun --nproc-per-node "$gpus" --nnodes "$nnodes" --node-rank "${NODE_RANK:-0}" \
    --rdzv-endpoint "${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}" \
    -m megatron_emo.train --recipe "$recipe" $overrides --set "train.output_dir=runs/$recipe-$layout" "$@"
