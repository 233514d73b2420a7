# The serving image: worker, snapshot sink, API and replay. onnxruntime only, no torch.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 1000 clv
WORKDIR /app
COPY pyproject.toml README.md ./
COPY features ./features
COPY models ./models
COPY export_onnx ./export_onnx
COPY stream ./stream
COPY state ./state
RUN pip install . && python -c "import importlib.util as u; assert u.find_spec('torch') is None"
USER clv
WORKDIR /home/clv
ENTRYPOINT ["clv"]
CMD ["--help"]
