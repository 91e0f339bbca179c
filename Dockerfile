# syntax=docker/dockerfile:1
# One image for every salesdash process: the API (default CMD), the three arq
# workers and the one-shot `salesdash migrate` (docker-compose.yml picks the command).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SALESDASH_DATA_DIR=/data

# Unprivileged runtime user (numeric uid so orchestrators can verify runAsNonRoot) and its /data:
# exports and reports. docker-compose.yml mounts a named volume there, shared by the api and the
# workers; a new named volume takes over this directory's ownership, so the user can write to it.
RUN groupadd --system --gid 10001 salesdash \
    && useradd --system --uid 10001 --gid salesdash --create-home --home-dir /home/salesdash salesdash \
    && mkdir -p /data \
    && chown salesdash:salesdash /data

WORKDIR /app

# 1) Third-party dependencies only, read from pyproject.toml: this layer is rebuilt
#    when the dependency list changes, not on every source edit.
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# 2) The project itself (packages salesdash, db, worker, api, cli + the `salesdash` console script).
#    README.md* is optional: the glob copies it when present without failing when absent.
COPY pyproject.toml README.md* ./
COPY salesdash ./salesdash
COPY api ./api
COPY db ./db
COPY worker ./worker
COPY cli ./cli
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info

USER 10001:10001

EXPOSE 8000

CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]
