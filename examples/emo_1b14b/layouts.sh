# Parallel layouts of emo_1b14b (and of its standard-MoE twin, stdmoe_1b14b) on H100 80 GB
# nodes of 8 GPUs. Sourced by torchrun.sh; `layout_overrides NAME` prints the layout's --set
# arguments for megatron_emo.train and tools/estimate_memory.py. A name starts with its number
# of GPUs. Per-GPU memory of each: README.md here.

layout_overrides() {
    # 1024 sequences of 4096 tokens per step (EMO's batch) in micro-batches of 2 per GPU.
    local batch="--set data.global_batch_size=1024 --set data.micro_batch_size=2"
    case "$1" in
        # Recommended: experts over the 8 GPUs of a node (the all-to-all stays on NVLink),
        # everything else data-parallel. d_model 2048 is too narrow for TP to pay.
        8 | 16 | 64 | 128)
            echo "$batch --set model.expert_model_parallel_size=8" ;;
        # Tensor + sequence parallelism (experts split over TP too), EP 4.
        8-tp2)
            echo "$batch --set model.tensor_model_parallel_size=2 --set model.sequence_parallel=True" \
                 "--set model.expert_model_parallel_size=4" ;;
        # Two pipeline stages (1F1B) of 8 layers.
        16-pp2)
            echo "$batch --set model.pipeline_model_parallel_size=2 --set model.expert_model_parallel_size=8" ;;
        # Two pipeline stages, each two interleaved virtual stages of 4 layers.
        64-pp2v2)
            echo "$batch --set model.pipeline_model_parallel_size=2" \
                 "--set model.virtual_pipeline_model_parallel_size=2 --set model.expert_model_parallel_size=8" ;;
        # Four stages split 3-5-5-3: the first and last also hold the embedding and the LM head.
        128-pp4)
            echo "$batch --set model.pipeline_model_parallel_size=4 --set model.num_layers_in_first_pipeline_stage=3" \
                 "--set model.num_layers_in_last_pipeline_stage=3 --set model.expert_model_parallel_size=8" ;;
        *)
            echo "unknown layout '$1': use 8, 16, 64, 128, 8-tp2, 16-pp2, 64-pp2v2 or 128-pp4" >&2
            return 2 ;;
    esac
}
