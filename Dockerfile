# genforge's OpenAI-compatible server. Build from the repository root:
#   docker build -t genforge-serve .
# Run with a model directory (config.json, *.safetensors, tokenizer.json) mounted at /models/model:
#   docker run -p 8000:8000 -v /path/to/model:/models/model:ro -e GENFORGE_API_KEYS=change-me genforge-serve
# Extra flags after the image name replace the default `--model /models/model` (see docs/serving.md).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1

# For a smaller CPU-only image, point pip at a PyTorch CPU wheel index while building:
#   docker build --build-arg PIP_EXTRA_INDEX_URL=<your CPU wheel index> -t genforge-serve .
ARG PIP_EXTRA_INDEX_URL=""

WORKDIR /opt/genforge
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && useradd --create-home --uid 10001 genforge

USER genforge
EXPOSE 8000
# uvicorn stops taking connections on SIGTERM, lets open requests finish (--drain-timeout), then exits.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"

ENTRYPOINT ["genforge", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "/models/model"]
