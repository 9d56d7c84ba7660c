# Two images from one file (docker-compose.yml builds both):
#   --target api      the HTTP API: `lathe` without the engine, so no torch (the build checks it)
#   --target worker   the workers: `lathe[engine]` (torch, transformers, ...), for training and /predict
# A plain `docker build .` builds the last stage, the API.
FROM python:3.11-slim AS python
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    LATHE_DATA_DIR=/data HF_HUB_DISABLE_TELEMETRY=1
WORKDIR /app
RUN useradd --create-home --uid 1000 lathe && mkdir -p /data && chown lathe /data

# The source, once for both images.
FROM scratch AS source
COPY pyproject.toml README.md alembic.ini /app/
COPY api /app/api
COPY core /app/core
COPY worker /app/worker
COPY lathe /app/lathe
COPY migrations /app/migrations

FROM python AS worker
# torch first, its own layer (kept when only the code changes): on Linux this pin takes the CUDA
# build the worker's GPU needs.
ARG TORCH_SPEC=torch==2.13.0
RUN pip install "${TORCH_SPEC}"
COPY --from=source /app /app
RUN pip install -e ".[engine]"
USER lathe
CMD ["lathe", "worker"]

FROM python AS api
COPY --from=source /app /app
RUN pip install -e . \
    && python -c "import importlib.util as u, sys; bad = [m for m in ('torch', 'transformers') if u.find_spec(m)]; sys.exit(f'the API image must not hold {bad}' if bad else 0)" \
    && python -c "import sys, api.main, lathe.cli; sys.exit('torch imported' if 'torch' in sys.modules else 0)"
USER lathe
EXPOSE 8000
CMD ["lathe", "api", "--host", "0.0.0.0", "--port", "8000"]
