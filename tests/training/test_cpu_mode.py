import torch

from megatron_emo.training.cpu_mode import cuda_on_cpu


def test_cuda_arguments_map_to_the_cpu_and_are_restored():
    original = torch.cuda.get_rng_state
    with cuda_on_cpu():
        assert torch.empty(3, device="cuda").device.type == "cpu"
        assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
        assert torch.ones(2).cuda().device.type == "cpu"
        assert torch.ones(2).to("cuda").device.type == "cpu"
        torch.cuda.manual_seed(5)
        state = torch.cuda.get_rng_state()
        first = torch.rand(3)
        torch.cuda.set_rng_state(state)
        assert torch.equal(torch.rand(3), first)
        with torch.cuda.stream(torch.cuda.Stream()):
            torch.cuda.current_stream().wait_stream(torch.cuda.Stream())
        torch.cuda.synchronize()
    assert torch.cuda.get_rng_state is original


def test_ddp_buffer_collectives_of_one_process_are_copies(megatron_cpu):
    from megatron.core.distributed import param_and_grad_buffer

    buffer = torch.arange(6.0)
    shard = torch.zeros(6)
    assert param_and_grad_buffer.dist_reduce_scatter_func(shard, buffer, group=None) is None
    assert torch.equal(shard, buffer)
    gathered = torch.zeros(6)
    handle = param_and_grad_buffer.dist_all_gather_func(gathered, shard, group=None, async_op=True)
    assert not isinstance(handle, torch.distributed.Work)  # copied here, not queued to gloo's threads
    handle.wait()
    assert torch.equal(gathered, buffer)


def test_ddp_buffer_collectives_are_restored():
    from megatron.core.distributed import param_and_grad_buffer

    original = param_and_grad_buffer.dist_all_gather_func
    with cuda_on_cpu():
        assert param_and_grad_buffer.dist_all_gather_func is not original
    assert param_and_grad_buffer.dist_all_gather_func is original
