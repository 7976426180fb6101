# One image for every docqueue service of docker-compose.yml; `docq` is the entry point.
# Build with `--build-arg EXTRAS=local` for the local model server (compiles llama.cpp).
FROM python:3.11-slim

ARG EXTRAS=""
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN if [ -n "$EXTRAS" ]; then \
      apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
      && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /app
COPY pyproject.toml README.md ./
COPY models models
COPY workers workers
COPY tasks tasks
COPY docqueue docqueue
# tzdata: schedule time zones must resolve even where the image has no system zone files.
RUN pip install ".${EXTRAS:+[$EXTRAS]}" tzdata

RUN useradd --create-home --uid 10001 docq && mkdir -p /data/home /data/models \
    && chown -R docq /data
USER docq
WORKDIR /data
ENTRYPOINT ["docq"]
CMD ["--help"]
