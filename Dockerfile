# CPU image: the README's install inside python:3.11-slim.
#   docker build -t dyn .
#   docker run --rm -v "$PWD:/work" dyn select --method hmin /work/data.jsonl -k 1000 -o /work/picked.jsonl
#
# GPU image: build on a CUDA base that already carries a CUDA torch, and skip the CPU wheel:
#   docker build -t dyn:cuda --build-arg BASE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime \
#       --build-arg TORCH_INDEX=none .
#   docker run --rm --gpus all -v "$PWD:/work" dyn:cuda select --method hmin /work/data.jsonl -k 1000 -o /work/picked.jsonl
# (the constraints file pins torch==2.13.0; on a base with another torch, drop `-c constraints.txt`
# or edit the pin: dyn needs torch >= 2.2 and never a faiss GPU wheel.)
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
WORKDIR /opt/dyn
COPY . .
RUN if [ "$TORCH_INDEX" != "none" ]; then pip install torch==2.13.0 --index-url "$TORCH_INDEX"; fi \
 && pip install -e ".[test]" $( [ "$TORCH_INDEX" != "none" ] && echo "-c constraints.txt" )

ENTRYPOINT ["dyn"]
CMD ["--help"]
