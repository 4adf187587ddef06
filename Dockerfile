# embserve on Ray's own image. The tag's Ray must be the ray[serve] version pyproject.toml pins (a unit test
# checks it). This is the CPU image; for NVIDIA GPUs build on rayproject/ray:2.60.0-py311-gpu instead
# (`--build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu`), which carries CUDA.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311
FROM ${RAY_IMAGE}

WORKDIR /home/ray/embserve
COPY --chown=ray:users pyproject.toml README.md LICENSE ./
COPY --chown=ray:users embserve ./embserve
COPY --chown=ray:users deployments ./deployments

# Packages come from pip's own configuration. The plain torch wheel carries CUDA; for a CPU-only image, pass
# `--build-arg TORCH=torch==2.13.0+cpu` with PIP_EXTRA_INDEX_URL set to PyTorch's CPU wheel index.
ARG TORCH=torch==2.13.0
ARG PIP_EXTRA_INDEX_URL
RUN pip install --no-cache-dir "${TORCH}" && pip install --no-cache-dir .

# The shipped config, listening on every interface of the container rather than on its loopback only.
COPY --chown=ray:users serve_config.yaml ./serve_config.yaml.shipped
RUN sed 's/^  host: 127.0.0.1$/  host: 0.0.0.0/' serve_config.yaml.shipped > serve_config.yaml \
    && grep -q '^  host: 0.0.0.0$' serve_config.yaml && rm serve_config.yaml.shipped

EXPOSE 8000
# embserve serve runs `serve run serve_config.yaml` on Serve's fast path and, as the container's first
# process, stops everything it started on `docker stop` (SIGTERM).
CMD ["embserve", "serve", "serve_config.yaml"]
