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
