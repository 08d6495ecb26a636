# megatron_emo for GPU clusters: NGC PyTorch (CUDA, PyTorch, Triton, NCCL, Python 3.12) plus
# megatron-core and this package, all installed when the image is built; a container starts
# training directly. TransformerEngine and apex, if the base image has them, are not needed.
#
#   docker build -t megatron_emo .
#   docker run --gpus all --ipc=host --rm -v /data:/data megatron_emo \
#       torchrun --nproc-per-node 8 -m megatron_emo.train --recipe emo_1b14b ...
#
# The multi-node launch scripts are in examples/emo_1b14b/.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

WORKDIR /opt/megatron_emo
COPY setup.py README.md ./
COPY megatron_emo megatron_emo
COPY tools tools
COPY examples examples

# The image's torch and triton satisfy setup.py's requirements and stay (NGC images pin them
# through PIP_CONSTRAINT); megatron-core comes as the cp312 wheel of the pinned line.
RUN pip install --no-cache-dir "megatron-core>=0.16.1,<0.17" ".[hf]" \
    && python -c "import megatron.core, megatron_emo.kernels.routing; from megatron.core.datasets import helpers_cpp"

ENV PYTHONUNBUFFERED=1
