# The AI worker's GPU image, as the ADR decided: CUDA 12.6 runtime, vLLM 0.6.3, Qwen2.5-7B-Instruct-AWQ.
FROM nvidia/cuda:12.6.3-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    # Must be in the environment before vllm is imported (the engine sets it too, for runs outside this image).
    VLLM_USE_V1=0 \
    ENGINE=vllm \
    # Model weights live on a named volume (compose: huggingface-cache), not in the image or the container layer.
    HF_HOME=/var/cache/huggingface \
    METRICS_PORT=9100

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Which vLLM: requirements.txt is the ADR's vLLM 0.6.3 (V0 engine, CUDA 12); the current vLLM (0.24.0, V1 engine
# only, torch 2.11 with CUDA 13 libraries from pip, NVIDIA driver >= 580) builds with
#   docker build --build-arg REQUIREMENTS=requirements-vllm-current.txt .
# The engine code is the same for both (processor/engines/vllm_engine.py); on the current vLLM it drops
# VLLM_USE_V1, which means nothing there, with one warning.
ARG REQUIREMENTS=requirements.txt
COPY ${REQUIREMENTS} requirements.txt
RUN python3 -m pip install -r requirements.txt

COPY processor/ processor/
COPY schemas/ schemas/

# Non-root; the cache directory is created owned by it so the named volume inherits the ownership.
RUN useradd --create-home --uid 10001 worker \
 && mkdir -p /var/cache/huggingface \
 && chown -R worker:worker /var/cache/huggingface
USER worker
VOLUME ["/var/cache/huggingface"]
EXPOSE 9100

# /healthz answers 200 while the consumer loop is turning (the first start downloads the model: allow for it).
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('METRICS_PORT', '9100'), timeout=4)"

# SIGTERM: stop fetching, finish (SHUTDOWN_TIMEOUT_S) or abandon the in-flight batch, commit, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "-m", "processor"]
CMD ["run"]
