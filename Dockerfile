# coom_nemo on NVIDIA's NeMo container (NeMo 2.7.x, megatron-core 0.15.x,
# TransformerEngine, Apex). Installed without dependencies so the
# container's pinned stack stays exactly as NVIDIA built it.
FROM nvcr.io/nvidia/nemo:26.02

WORKDIR /opt/coom_nemo
COPY pyproject.toml README.md ./
COPY coom_nemo ./coom_nemo
COPY recipes ./recipes
COPY data_prep ./data_prep
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e . \
    && python -c "import importlib.metadata as m; \
assert any(e.name == 'coom' for e in m.entry_points(group='nemo_run.cli'))"
ENV HF_HUB_OFFLINE=1
