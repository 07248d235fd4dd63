# The gpuboss image: the boss service (`gpuboss serve`) and the NVML agent (`gpuboss agent`).
# docker-compose.yml builds it; on its own: docker build -t gpuboss .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The client's build hook takes the Lua scripts from lua/ beside client/, so both go in as they
# sit in the repository. Runtime dependencies only: no dev extras in the image. The nvml extra
# brings nvidia-ml-py for the agent; it loads the driver's library lazily, so the boss runs
# without a GPU.
WORKDIR /src
COPY lua/ lua/
COPY client/ client/
COPY pyproject.toml README.md ./
COPY gpuboss/ gpuboss/
COPY cli/ cli/
RUN pip install ./client ".[nvml]" \
    && rm -rf /src

# Never run as root. The home directory holds the state dir of an embedded Redis, which the
# compose file does not use (it points the boss at its redis service).
RUN useradd --system --create-home --home-dir /home/gpuboss --uid 10001 --user-group gpuboss
USER gpuboss
WORKDIR /home/gpuboss

EXPOSE 8765
# Listening beyond loopback needs GPUBOSS_TOKENS: without them the service refuses to start.
CMD ["gpuboss", "serve", "--host", "0.0.0.0"]
