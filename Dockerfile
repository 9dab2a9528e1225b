FROM python:3.11-slim
WORKDIR /app
# TORCH_SPEC: a CPU wheel by default; pass a CUDA build for the GPU worker image.
ARG TORCH_SPEC=torch==2.13.0
RUN pip install --no-cache-dir "${TORCH_SPEC}"
COPY . /app
RUN pip install --no-cache-dir -e .
ENV PORT=8000
