"""The web app of ``jam serve``: a chat page and a small JSON + server-sent-events API over
``generation.chat.ChatModel`` (issue 25 item 4; docs/CONVERSATIONS.md).

Routes (nothing else is served: no static files, no paths from a request ever touch the disk)::

    GET    /                                the page (page.py)
    GET    /app.js                          its script
    POST   /api/conversations               -> {"id", "pictures", "max_picture_bytes"}: a new
                                            conversation (one per browser tab)
    DELETE /api/conversations/{id}          forget it ("new conversation")
    POST   /api/conversations/{id}/messages {"text", "image": base64 PNG/JPEG or null}
                                            -> text/event-stream of ``ChatEvent``s, then {"kind": "end"}
    POST   /api/conversations/{id}/stop     stop the answer being written

Limits (``ServeLimits``): request bodies, picture bytes and pixels, message length, conversations
kept (the least recently used idle one is forgotten first) and answers written at once (beyond
that the server answers 503 "busy" at once instead of queueing). Bad input gets a 4xx JSON
``{"error": "..."}`` naming what is wrong; an unexpected failure is logged on the server and the
visitor reads one line, never a traceback. Answers are written on worker threads (the weights are
shared; each conversation has its own engine and KV cache), so the event loop stays free and
other tabs keep streaming while a picture is drawn.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jam_metaseq.generation.chat import ChatEvent, ChatModel, ChatSession

from .page import APP_JS, PAGE_HTML

log = logging.getLogger("jam.serve")

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
                               "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass
class ServeLimits:
    """What one visitor may ask of the server."""

    max_body_bytes: int = 8 << 20
    """Largest request body (a message with its picture, base64 included)."""
    max_image_bytes: int = 4 << 20
    """Largest picture file."""
    max_image_pixels: int = 4096 * 4096
    """Largest picture in pixels (decompression bombs stop here)."""
    max_text_chars: int = 4000
    """Longest message text."""
    max_conversations: int = 8
    """Conversations kept (each holds a KV cache); the least recently used idle one goes first."""
    max_generating: int = 2
    """Answers written at once; more are refused with 503 until one finishes."""


class BadInput(Exception):
    """A request the server refuses, with the status and the message the visitor reads."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Conversation:
    session: ChatSession
    last_used: float
    busy: bool = False
    stop: bool = False


class ChatServer:
    """The conversations of one served model and the bounds around them."""

    def __init__(self, chat: ChatModel, *, limits: ServeLimits | None = None) -> None:
        self.chat = chat
        self.limits = limits or ServeLimits()
        self.conversations: OrderedDict[str, _Conversation] = OrderedDict()
        self.generating = 0
        self.lock = threading.Lock()

    # ---- conversations ---------------------------------------------------------------------------
    def new_conversation(self) -> str:
        with self.lock:
            while len(self.conversations) >= self.limits.max_conversations:
                idle = next((k for k, c in self.conversations.items() if not c.busy), None)
                if idle is None:
                    raise BadInput(503, "the server is busy: every conversation is writing an answer; try again soon")
                del self.conversations[idle]  # least recently used first (the dict keeps use order)
            cid = secrets.token_urlsafe(16)
            self.conversations[cid] = _Conversation(self.chat.session(), time.monotonic())
            return cid

    def get(self, cid: str) -> _Conversation:
        with self.lock:
            conv = self.conversations.get(cid)
            if conv is None:
                raise BadInput(404, "unknown conversation (it may have been forgotten to make room): "
                                    "start a new conversation")
            self.conversations.move_to_end(cid)
            conv.last_used = time.monotonic()
            return conv

    def forget(self, cid: str) -> None:
        with self.lock:
            conv = self.conversations.get(cid)
            if conv is not None:
                conv.stop = True
                del self.conversations[cid]

    def start_answer(self, conv: _Conversation) -> None:
        with self.lock:
            if conv.busy:
                raise BadInput(409, "an answer is still being written in this conversation: wait or press stop")
            if self.generating >= self.limits.max_generating:
                raise BadInput(503, f"the server is writing {self.generating} answers already; try again in a moment")
            self.generating += 1
            conv.busy, conv.stop = True, False

    def end_answer(self, conv: _Conversation) -> None:
        with self.lock:
            self.generating -= 1
            conv.busy = False

    # ---- input -----------------------------------------------------------------------------------
    def parse_message(self, body: bytes) -> tuple[str, Any]:
        """(text, PIL image or None) from the JSON body; ``BadInput`` names what is wrong."""
        try:
            d = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadInput(400, "the message is not JSON") from None
        if not isinstance(d, dict) or set(d) - {"text", "image"}:
            raise BadInput(400, "a message is {\"text\": str, \"image\": base64 string or null}")
        text, image = d.get("text", ""), d.get("image")
        if not isinstance(text, str):
            raise BadInput(400, "'text' must be a string")
        if len(text) > self.limits.max_text_chars:
            raise BadInput(413, f"the message has {len(text)} characters; at most {self.limits.max_text_chars}")
        if image is None:
            if not text.strip():
                raise BadInput(400, "an empty message: write something or attach a picture")
            return text, None
        if self.chat.image_tokenizer is None:
            raise BadInput(400, "this server reads no pictures (start it with --image-tokenizer)")
        if not isinstance(image, str):
            raise BadInput(400, "'image' must be a base64 string")
        try:
            raw = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise BadInput(400, "the picture is not valid base64") from None
        if len(raw) > self.limits.max_image_bytes:
            raise BadInput(413, f"the picture has {len(raw) / 2**20:.1f} MiB; at most "
                                f"{self.limits.max_image_bytes / 2**20:.1f} MiB")
        return text, self._open_image(raw)

    def _open_image(self, raw: bytes) -> Any:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(raw)) as im:
                if im.width * im.height > self.limits.max_image_pixels:
                    raise BadInput(413, f"the picture is {im.width}x{im.height} pixels; at most "
                                        f"{self.limits.max_image_pixels} pixels")
                im.load()
                return im.convert("RGB")
        except BadInput:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            raise BadInput(400, "that file is not a picture this server reads (PNG, JPEG, GIF, WebP, ...)") from None

    # ---- one answer ------------------------------------------------------------------------------
    def answer(self, conv: _Conversation, text: str, image: Any) -> asyncio.Queue:
        """Start writing the answer on a worker thread (``start_answer`` first); its events arrive
        on the returned queue, the last one ``{"kind": "end"}``. Call from the event loop."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item: dict) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def on_event(e: ChatEvent) -> None:
            d = e.to_dict()
            if e.png is not None:
                d["png"] = "data:image/png;base64," + base64.b64encode(e.png).decode()
            put(d)

        def work() -> None:
            try:
                conv.session.say(text, image=image, on_event=on_event, should_stop=lambda: conv.stop)
            except ValueError as e:  # the model cannot take this message (too long, ...): say why
                put({"kind": "error", "message": str(e)})
            except Exception:  # noqa: BLE001 -- a bug: the log has the traceback, the visitor one line
                log.exception("answer failed")
                put({"kind": "error", "message": "the server failed to write an answer (see its log)"})
            finally:
                self.end_answer(conv)
                put({"kind": "end"})

        threading.Thread(target=work, name="jam-answer", daemon=True).start()
        return queue


async def sse(queue: asyncio.Queue, conv: _Conversation) -> AsyncIterator[bytes]:
    """The queue's events as server-sent-event frames; a tab that goes away stops its answer."""
    finished = False
    try:
        while not finished:
            item = await queue.get()
            finished = item["kind"] == "end"
            yield f"data: {json.dumps(item)}\n\n".encode()
    finally:
        if not finished:
            conv.stop = True


def create_app(chat: ChatModel, *, limits: ServeLimits | None = None) -> Starlette:
    """The ASGI app serving ``chat``."""
    server = ChatServer(chat, limits=limits)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=SECURITY_HEADERS)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > server.limits.max_body_bytes:
            raise BadInput(413, f"the request has {int(declared) / 2**20:.1f} MiB; at most "
                                f"{server.limits.max_body_bytes / 2**20:.1f} MiB")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > server.limits.max_body_bytes:
                raise BadInput(413, f"the request is larger than {server.limits.max_body_bytes / 2**20:.1f} MiB")
        return bytes(body)

    async def page(_request: Request) -> Response:
        return Response(PAGE_HTML, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    async def script(_request: Request) -> Response:
        return Response(APP_JS, media_type="text/javascript; charset=utf-8", headers=SECURITY_HEADERS)

    async def new_conversation(_request: Request) -> Response:
        cid = await asyncio.to_thread(server.new_conversation)
        return JSONResponse({"id": cid, "pictures": chat.image_tokenizer is not None,
                             "max_picture_bytes": server.limits.max_image_bytes}, headers=SECURITY_HEADERS)

    async def forget(request: Request) -> Response:
        server.forget(request.path_params["cid"])
        return JSONResponse({"ok": True}, headers=SECURITY_HEADERS)

    async def stop(request: Request) -> Response:
        server.get(request.path_params["cid"]).stop = True
        return JSONResponse({"ok": True}, headers=SECURITY_HEADERS)

    async def message(request: Request) -> Response:
        conv = server.get(request.path_params["cid"])
        text, image = server.parse_message(await read_body(request))
        server.start_answer(conv)
        queue = server.answer(conv, text, image)
        headers = {**SECURITY_HEADERS, "X-Accel-Buffering": "no"}
        return StreamingResponse(sse(queue, conv), media_type="text/event-stream", headers=headers)

    async def bad_input(_request: Request, exc: BadInput) -> Response:
        return error(exc.status, exc.message)

    async def http_error(_request: Request, exc: HTTPException) -> Response:
        return error(exc.status_code, {404: "no such page", 405: "method not allowed"}.get(exc.status_code,
                                                                                          str(exc.detail)))

    async def crash(_request: Request, exc: Exception) -> Response:
        log.error("request failed", exc_info=exc)
        return error(500, "the server failed (see its log)")

    routes = [
        Route("/", page), Route("/app.js", script),
        Route("/api/conversations", new_conversation, methods=["POST"]),
        Route("/api/conversations/{cid}", forget, methods=["DELETE"]),
        Route("/api/conversations/{cid}/messages", message, methods=["POST"]),
        Route("/api/conversations/{cid}/stop", stop, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={BadInput: bad_input, HTTPException: http_error,
                                                      Exception: crash})
    app.state.server = server
    return app
