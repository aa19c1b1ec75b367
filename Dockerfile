# The distop server (distop/callee.py) as an image.
#   docker build -t distopsrv .
#   docker run -d -e AMQP_URL=amqp://guest:guest@rabbit-host:5672/%2F distopsrv
# Run it N times for N servers; `docker stop -t 30` lets each finish its chunk in hand.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH=/app
WORKDIR /app

# Requirements first, so that code changes reuse the cached layer.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY distop/ distop/
RUN useradd --no-create-home --uid 10001 distop
# By number, so that the runtime can tell it is not root without reading /etc/passwd.
USER 10001:10001

# Exec form: the server is PID 1 and gets SIGTERM itself.
CMD ["python", "distop/callee.py"]
