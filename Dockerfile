# The usage-ledger image: one image for every process (`ledger worker`,
# `ledger projector`, `ledger webhooks`, `ledger api`, and the one-off commands such as
# `ledger plans publish`). docker-compose.yml runs it against Kafka and PostgreSQL.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LEDGER_HOME=/data

# Every runtime dependency ships manylinux wheels for CPython 3.11, so the slim
# image needs no compiler.
WORKDIR /app
COPY . /app
RUN pip install . \
    && rm -rf /app/build /app/*.egg-info

# Non-root; /data (worker state, DuckDB history) belongs to it. An empty named
# volume mounted on /data takes this ownership when it is first created.
RUN useradd --system --uid 10001 --user-group --home-dir /app --no-create-home ledger \
    && mkdir -p /data \
    && chown ledger:ledger /data
USER ledger
VOLUME ["/data"]

ENTRYPOINT ["ledger"]
CMD ["worker"]
