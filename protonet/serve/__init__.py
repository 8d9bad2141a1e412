"""`protonet serve`: a model behind an HTTP API and a web page.

- predictor.py: what runs (a classifier today; the hook for detection), one decoded
  image -> its net inputs, a batch of inputs -> one answer per image
- batching.py: gathers concurrent requests into one forward pass
- app.py: the ASGI app (Starlette): routes, upload limits, JSON errors
- page.html: the web page at `/` (static HTML + JS, nothing fetched from elsewhere)

Starlette, uvicorn and python-multipart are the `serve` extra; only the `serve`
command imports this package.
"""
