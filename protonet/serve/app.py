"""The ASGI app: routes, upload limits and JSON errors.

    GET  /          the web page (page.html)
    GET  /healthz   {"status": "ok", ...}
    GET  /model     what is served: name, inputs, outputs, preprocessing, labels
    POST /predict   an image as the multipart field `image`, or as the raw body
                    (Content-Type image/* or application/octet-stream); ?k=5, ?oversample=1

Every refusal is JSON {"error": "..."} with a 4xx status, and the server goes on. The
body is read with a byte budget (Content-Length is checked first, then what arrives is
counted), the image header's pixel count is checked before decoding, and nothing a
client sends is used as a path: uploads stay in memory.
"""
from __future__ import annotations

import contextlib
import logging
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from .. import classify
from ..errors import ProtonetError
from .batching import Batcher

log = logging.getLogger("protonet")

RAW_TYPES = ("application/octet-stream",)
HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


class Refused(Exception):
    """A request answered with a 4xx JSON error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=HEADERS)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or Refused(413) as soon as it is known to exceed `limit`."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise Refused(400, f"Content-Length '{length[:40]}' is not a byte count")
        if int(length) > limit:
            raise Refused(413, f"upload of {int(length)} bytes is over the limit of "
                               f"{limit} bytes (--max-upload-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"upload is over the limit of {limit} bytes "
                               "(--max-upload-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_bytes(request: Request, limit: int) -> bytes:
    """The uploaded image's bytes, from a multipart form or the raw body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = kind == "multipart/form-data"
    if not (multipart or kind.startswith("image/") or kind in RAW_TYPES):
        raise Refused(415, f"Content-Type '{kind[:60] or '(none)'}' is not accepted: send "
                           "multipart/form-data with an 'image' field, or the image bytes "
                           "as image/* or application/octet-stream")
    body = await read_body(request, limit)
    if multipart:
        body = await _form_image(request, body, limit)
    if not body:
        raise Refused(400, "the image is empty")
    return body


async def _form_image(request: Request, body: bytes, limit: int) -> bytes:
    sent = False

    async def replay():                   # the body, already read within the limit
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, replay).form(
                max_files=1, max_fields=16, max_part_size=limit) as form:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise Refused(400, "the form has no file field 'image'" if upload is None
                              else "the form's 'image' field is text, not a file")
            return await upload.read()
    except HTTPException as e:                       # starlette's multipart errors
        raise Refused(400, f"malformed multipart form: {e.detail}") from None


def create_app(predictor, max_batch: int = 8, max_wait_ms: float = 5,
               max_upload_bytes: int = 16 << 20) -> Starlette:
    """The app for a loaded predictor (see predictor.py)."""
    batcher = Batcher(predictor.run, max_batch, max_wait_ms / 1000)
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
    about = dict(predictor.describe(), max_batch=max_batch, max_wait_ms=max_wait_ms,
                 max_upload_bytes=max_upload_bytes)

    async def index(request):
        return HTMLResponse(page, headers=HEADERS)

    async def healthz(request):
        return JSONResponse({"status": "ok", "model": predictor.name,
                             "batches": batcher.batches, "images": batcher.images,
                             "waiting": batcher.waiting}, headers=HEADERS)

    async def model(request):
        return JSONResponse(about, headers=HEADERS)

    async def predict(request):
        try:
            options = predictor.options(request.query_params)
            data = await image_bytes(request, max_upload_bytes)
            prepared = await run_in_threadpool(_prepare, predictor, data, options)
        except Refused as e:
            return error(e.status, e.message)
        except ProtonetError as e:                   # bad option, undecodable image
            return error(400, str(e))
        except Exception as e:                       # a bug of ours, not the client's
            log.exception("preprocessing failed")
            return error(500, f"could not preprocess the image: {e}")
        try:
            answer = await batcher.submit(prepared)
        except Exception as e:
            log.error("predict failed: %s", e)
            return error(500, f"the model failed on this image: {e}")
        return JSONResponse({"model": predictor.name, **answer}, headers=HEADERS)

    async def http_error(request, exc: HTTPException):
        return error(exc.status_code, exc.detail)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = Starlette(routes=[Route("/", index), Route("/healthz", healthz),
                            Route("/model", model), Route("/predict", predict,
                                                          methods=["POST"])],
                    exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.batcher = batcher
    return app


def _prepare(predictor, data: bytes, options: dict):
    """Decode (limits checked) and preprocess, off the event loop."""
    return predictor.prepare(classify.decode_image(data, "uploaded image"), options)
