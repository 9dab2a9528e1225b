FROM python:3.11-slim
# TORCH_SPEC: a CPU wheel by default; pass a CUDA build for the GPU worker image.
ARG TORCH_SPEC=torch==2.13.0
RUN pip install --no-cache-dir "${TORCH_SPEC}"
# Installed as a package (model and word list are package data); the source tree is not kept in the image.
COPY . /src
RUN pip install --no-cache-dir /src && rm -rf /src
WORKDIR /app
ENV PORT=8000
