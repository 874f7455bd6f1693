# affinity-proxy image: non-root, health-checked. Build: docker build -t affinity-proxy .
# Run: docker run -e COOKIE_SECRET=$(openssl rand -hex 32) -e ADMIN_TOKEN=$(openssl rand -hex 32) ...
# The shipped configs hold no secrets: without these variables `serve` exits 2 naming them.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY affinity_proxy ./affinity_proxy
RUN pip install --no-cache-dir --prefix=/install '.[fast]'

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin affinity
COPY --from=build /install /usr/local
COPY config /app/config
WORKDIR /app
USER affinity
EXPOSE 8080 9091
ENV LOG_FORMAT=json
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/_affinity/health', timeout=2).status == 200 else 1)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["affinity-proxy"]
CMD ["serve", "--config", "/app/config/proxy.yaml"]
