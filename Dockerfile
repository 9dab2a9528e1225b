FROM python:3.11-slim
# TORCH_SPEC: a CPU wheel by default; pass a CUDA build for the GPU worker image.
ARG TORCH_SPEC=torch==2.13.0
RUN pip install --no-cache-dir "${TORCH_SPEC}"
# Installed as a package (model and word list are package data); the source tree is not kept in the image.
# .dockerignore keeps the virtualenv, git history, runtime state and training work out of the build context.
COPY . /src
RUN pip install --no-cache-dir /src && rm -rf /src
# The services run as an unprivileged user (uid 10001, numeric below so `runAsNonRoot` checks can verify it). It
# owns /cache, where docker-compose mounts the ASR_CACHE_DIR volume (a new named volume takes the owner of the
# image's directory), and its home (~/.cache/arabic-words is ASR_CACHE_DIR's default). /app stays root's: nothing
# there is writable by the services (Flower, for one, would read a flowerconfig.py from its working directory).
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin app \
    && mkdir -p /cache && chown app:app /cache && chmod 0700 /cache
WORKDIR /app
ENV PORT=8000 HOME=/home/app
USER 10001:10001
