# reasoning-agent: dependencies built in one stage, a small non-root runtime in the next.
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install --no-compile -r /tmp/requirements.txt
COPY service/ service/
RUN pip install --no-compile --no-deps . \
 && pip uninstall --yes --quiet pip \
 && python -m compileall -q -j 0 /opt/venv /src/service

FROM ${PYTHON_IMAGE}
ARG UID=10001
RUN groupadd --system --gid "${UID}" app \
 && useradd --system --uid "${UID}" --gid app --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app \
 && mkdir -p /data \
 && chown "${UID}:${UID}" /data
COPY --from=builder /opt/venv /opt/venv
# The source also sits on PYTHONPATH, ahead of site-packages, so `skaffold dev` can sync it.
COPY --from=builder --chown=${UID}:${UID} /src/service /app/service
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app/service \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    WORKERS=1 \
    DATABASE_URL=sqlite:////data/reasoning_agent.db
WORKDIR /app
USER ${UID}:${UID}
EXPOSE 8000
ENTRYPOINT ["reasoning-agent"]
CMD ["serve"]
