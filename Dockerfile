# edge-agent for an aarch64 balena fleet (Raspberry Pi 4/5, Jetson). The device image holds
# only the runtime (onnxruntime, tokenizers, numpy, paho-mqtt): no torch, no build extra.
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 \
    EDGE_SLM_CACHE=/data/cache EDGE_AGENT_STATE_DIR=/data/state
WORKDIR /opt/edge-slm-agent
COPY pyproject.toml README.md LICENSE MANIFEST.in ./
COPY docs ./docs
COPY agent ./agent
COPY model_packs ./model_packs
COPY fleet ./fleet
COPY tools ./tools
RUN pip install . && useradd --system --home /data edge && mkdir -p /data && chown edge /data
COPY systemd/agent.yaml /etc/edge-agent/agent.yaml
USER edge
VOLUME ["/data"]
# The pack arrives through the fleet (signed updates) or is copied to /data/cache/packs.
CMD ["edge-agent", "run", "--config", "/etc/edge-agent/agent.yaml"]
