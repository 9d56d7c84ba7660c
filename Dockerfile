# One image for the API and the worker (docker-compose.yml picks the command).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    LATHE_DATA_DIR=/data HF_HUB_DISABLE_TELEMETRY=1
WORKDIR /app

# torch first, its own layer: on Linux this pin takes the CUDA build the worker's GPU needs.
ARG TORCH_SPEC=torch==2.13.0
RUN pip install "${TORCH_SPEC}"

COPY pyproject.toml README.md alembic.ini ./
COPY api ./api
COPY core ./core
COPY worker ./worker
COPY lathe ./lathe
COPY migrations ./migrations
RUN pip install -e . && useradd --create-home --uid 1000 lathe && mkdir -p /data && chown lathe /data
USER lathe

EXPOSE 8000
CMD ["lathe", "api", "--host", "0.0.0.0", "--port", "8000"]
