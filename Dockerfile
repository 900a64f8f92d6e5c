# relay: self-hosted email sending service. Build: docker build -t relay .
# Run:  docker run -d --name relay -p 587:587 -p 465:465 -p 8025:8025 \
#         -v relay-data:/var/lib/relay relay
#       docker exec -it relay relay account add alice
# Config: mount a file over /etc/relay/relay.yaml, or keep the built-in one and set
# RELAY_DATABASE_URL / RELAY_SECRET in the environment. Details: docs/operations.md.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RELAY_CONFIG=/etc/relay/relay.yaml

RUN groupadd --system --gid 10025 relay \
    && useradd --system --uid 10025 --gid relay --home-dir /var/lib/relay --shell /usr/sbin/nologin relay \
    && mkdir -p /var/lib/relay /etc/relay \
    && chown relay:relay /var/lib/relay

WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip install . && rm -rf /src

COPY docker/config.yaml /etc/relay/relay.yaml

USER 10025:10025
WORKDIR /var/lib/relay
VOLUME ["/var/lib/relay"]
# Docker lets unprivileged processes bind low ports inside the container
# (net.ipv4.ip_unprivileged_port_start=0), so no capability is needed here.
EXPOSE 587 465 25 8025

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8025/healthz', timeout=4).status == 200 else 1)"]

# migrate is idempotent: it creates the schema on first start and upgrades it after.
CMD ["sh", "-c", "relay migrate && exec relay serve"]
