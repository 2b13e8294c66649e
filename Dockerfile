# The gateway: gunicorn + runner_mw serving examples/wsgi_app.py (replace it with your app).
#
#   docker build -t runner-mw-gateway .
#   docker run --rm -p 127.0.0.1:8000:8000 -v /etc/runner-mw:/etc/runner-mw:ro \
#       -e RUNNER_MW_CONFIG=/etc/runner-mw/runner.yaml runner-mw-gateway
#
# Config: $RUNNER_MW_CONFIG (default the image's config/runner.yaml, whose access admits
# loopback only; Compose uses config/compose.yaml, Kubernetes mounts a ConfigMap). `docker kill -s HUP <container>` reloads
# it in place (gunicorn is PID 1 and runs runner_mw's hooks from config/gunicorn.conf.py).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The package first (a layer that changes less often than the config and the app), installed
# from a folder that is then emptied: the app's folder must not shadow it with a source copy.
WORKDIR /src
COPY setup.py pyproject.toml README.md ./
COPY schemas ./schemas
COPY runner_mw ./runner_mw
RUN pip install ".[gunicorn,metrics]" "flask>=2.3" && rm -rf /src/*

WORKDIR /app
COPY config ./config
COPY examples ./examples

# Not root.
RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent gateway
USER 10001
ENV RUNNER_MW_CONFIG=/app/config/runner.yaml \
    RUNNER_MW_BIND=0.0.0.0:8000

EXPOSE 8000

# The gateway's own liveness endpoint (no access check, no runner call).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8000/runner/-/healthz', timeout=4)"]

CMD ["gunicorn", "-c", "config/gunicorn.conf.py", "examples.wsgi_app:application"]
