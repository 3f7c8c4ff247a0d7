r"""Serve a video LLM over HTTP: ``python -m experiments.serve --workdir=DIR [--port 8000]``.

    --workdir=DIR          a training run or a converted checkpoint (then also --tokenizer=DIR), as for chat
    --host=127.0.0.1 --port=8000    where to listen (--port=0: any free port; the address is printed)
    --slots=8              conversations decoded together in one compiled batch (experiments.engine)
    --max_new_tokens=256   the default and the cap of a request's ``max_tokens``
    --max_context=0        tokens per slot's KV cache (0: as chat)
    --max_upload_mb=64     the largest video accepted, uploaded or inline as a ``data:`` URL
    --quantize=int8        int8 weights with per-channel scales (vjax.layers.quant), about half of bf16's memory
    --step=N               a training run's checkpoint of step N (default: the newest that restores)

Endpoints (OpenAI's chat format; errors are ``{"error": {"message": ..., "type": ...}}`` with a 4xx status):

    GET  /health                  {"status": "ok"}
    GET  /v1/models               the model, in OpenAI's list format
    POST /v1/chat/completions     messages (the video in the first user message), max_tokens, temperature,
                                  top_p, seed, stream (server-sent events)
    GET  /                        a web page: pick or upload a video, see its frames, ask, watch the answer stream
    GET  /v1/clips                the synthetic test clips of the run's data set
    POST /v1/videos               multipart ``file``: stores an upload, returns its server-side path
    POST /v1/frames               {"video": path}: the sampled frames as the model sees them (JPEG data URLs)

The video of a chat request is a content part of the first user message: ``{"type": "video_url", "video_url":
{"url": "file:///abs/clip.mp4" | "/abs/clip.mp4" | "data:video/mp4;base64,..."}}`` or ``{"type": "video",
"video": "/abs/clip.mp4"}``. System messages are ignored: the model's own chat template (and its system prompt)
frames the conversation. Earlier user/assistant pairs are the history; the last user message is the question.
Every request is answered by :class:`experiments.engine.Engine`, which decodes the conversations of all
requests in flight together; a client that disconnects frees its slot at the next decoding step.

A bad flag, or a directory that is not a checkpoint: one ``error:`` line, exit code 2 (:mod:`experiments.cli`).
The server reads any local file the request names (as the user running it): it listens on loopback by default.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' `Request` annotations as objects.
import asyncio
import base64
import binascii
import hashlib
import io
import json
import os
import re
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from absl import flags

from experiments import cli, config

FLAGS = flags.FLAGS
STATIC = Path(__file__).resolve().parent / "static"
JSON_SLACK = 1 << 20  # bytes of a JSON body beyond its base64 video: the messages and options
POLL_S = 0.25  # how often a waiting request checks that its client is still there


def define_flags() -> None:
    """The command's flags (defined when run as a command, so the module imports beside chat and eval)."""
    config.define_checkpoint_flags()
    flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    flags.DEFINE_integer("port", 8000, "port to listen on (0: any free port)")
    flags.DEFINE_integer("slots", 8, "conversations decoded together in one batch")
    flags.DEFINE_integer("max_new_tokens", 256, "default and largest max_tokens of a request")
    flags.DEFINE_integer("max_context", 0, "context in tokens of each slot (0: the LLM's, at most 8192, as chat)")
    flags.DEFINE_integer("max_upload_mb", 64, "largest video accepted (an upload or a data: URL), in MiB")
    flags.DEFINE_string("upload_dir", None, "where uploaded videos are stored (default: a fresh temporary folder)")


# ------------------------------------------------------------------------------------------------ errors
class ApiError(Exception):
    """A request the server refuses: its HTTP status and a one-line message naming the bad value."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, " ".join(str(message).split()), kind


def _error(status: int, message: str, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse  # noqa: PLC0415

    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# ------------------------------------------------------------------------------------------------ bodies
async def _read_limited(request, limit: int, what: str) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (before it is all read)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"{what} of {_mb(int(declared))} is over the limit of {_mb(limit)} (--max_upload_mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"{what} is over the limit of {_mb(limit)} (--max_upload_mb)")
        chunks.append(chunk)
    return b"".join(chunks)


def _limited_receive(request, limit: int, what: str):
    """An ASGI ``receive`` that raises 413 once the body passes ``limit`` bytes (for the multipart parser)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"{what} of {_mb(int(declared))} is over the limit of {_mb(limit)} (--max_upload_mb)")
    seen = [0]

    async def receive():
        message = await request.receive()
        seen[0] += len(message.get("body", b""))
        if seen[0] > limit:
            raise ApiError(413, f"{what} is over the limit of {_mb(limit)} (--max_upload_mb)")
        return message

    return receive


def _number(body: dict, key: str, default, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False):
    v = body.get(key)
    if v is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kind):
        raise ApiError(400, f"{key} must be {'an integer' if integer else 'a number'}, got {json.dumps(v)[:60]}")
    if v < lo or v > hi or (lo_open and v == lo):
        span = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise ApiError(400, f"{key}={v} is out of range {span}")
    return v


# ------------------------------------------------------------------------------------------------ videos
class Videos:
    """Where the videos named by requests are: local paths as given, uploads and data: URLs stored by content."""

    def __init__(self, upload_dir: str, max_bytes: int):
        self.dir, self.max_bytes = upload_dir, max_bytes
        os.makedirs(upload_dir, exist_ok=True)

    def store(self, data: bytes, suffix: str = ".mp4") -> str:
        """Bytes of a video -> a file under the upload folder named by their hash (the same bytes, one file)."""
        path = os.path.join(self.dir, hashlib.sha256(data).hexdigest()[:24] + suffix)
        if not os.path.exists(path):
            tmp = f"{path}.{uuid.uuid4().hex}.part"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return path

    def resolve(self, ref: Any, where: str) -> str:
        """A file path, a ``file://`` URL or a ``data:video/...;base64,`` URL -> a local path."""
        if not isinstance(ref, str) or not ref.strip():
            raise ApiError(400, f"{where}: the video must be a non-empty string (a path, file:// or data: URL)")
        ref = ref.strip()
        if ref.startswith("data:"):
            head, sep, payload = ref.partition(",")
            if not sep or not head.endswith(";base64"):
                raise ApiError(400, f"{where}: a data: URL must be base64 (data:video/mp4;base64,...)")
            if len(payload) * 3 // 4 > self.max_bytes:
                raise ApiError(413, f"{where}: the data: URL's video of about {_mb(len(payload) * 3 // 4)} is over "
                                    f"the limit of {_mb(self.max_bytes)} (--max_upload_mb)")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, f"{where}: the data: URL is not valid base64") from None
            return self.store(data, _suffix(head[5:].split(";")[0]))
        if ref.startswith("file://"):
            u = urlparse(ref)
            if u.netloc not in ("", "localhost"):
                raise ApiError(400, f"{where}: file URL {ref[:200]!r} names another host")
            ref = unquote(u.path)
        elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", ref):
            raise ApiError(400, f"{where}: {ref[:200]!r}: only local paths, file:// and data: URLs are read (upload "
                                "the video with POST /v1/videos)")
        if not os.path.isabs(ref):
            raise ApiError(400, f"{where}: video path {ref[:200]!r} is not absolute")
        return ref


def _suffix(mime_or_name: str) -> str:
    """``video/webm`` or ``clip.webm`` -> ``.webm`` (a short alphanumeric suffix; ``.mp4`` otherwise)."""
    s = mime_or_name.rsplit("/", 1)[-1] if "/" in mime_or_name else Path(mime_or_name).suffix.lstrip(".")
    return f".{s.lower()}" if re.fullmatch(r"[A-Za-z0-9]{1,8}", s or "") else ".mp4"


# ------------------------------------------------------------------------------------------------ messages
def _text_and_video(content: Any, where: str) -> tuple[str, Any]:
    """A message's content (a string, or a list of parts) -> (its text, its video reference or None)."""
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of content parts")
    texts, video = [], None
    for i, part in enumerate(content):
        at = f"{where}.content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{at}.text must be a string")
            texts.append(part["text"])
            continue
        if kind == "video_url":
            url = part.get("video_url")
            ref = url.get("url") if isinstance(url, dict) else url
        elif kind == "video":
            ref = part.get("video")
        else:
            raise ApiError(400, f"{at}: unknown content part type {json.dumps(kind)[:60]} (text, video_url or video)")
        if video is not None:
            raise ApiError(400, f"{at}: one video per conversation")
        video = (ref, at)
    return "\n".join(t.strip() for t in texts if t.strip()), video


def parse_messages(messages: Any) -> tuple[Any, list[tuple[str, str]], str]:
    """OpenAI ``messages`` -> ``((video reference, where), [(question, answer), ...], question)``."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects")
    turns, video = [], None
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"{where}.role must be system, user or assistant, got {json.dumps(role)[:40]}")
        if "content" not in m:
            raise ApiError(400, f"{where} has no content")
        if role == "system":
            continue  # the model's template has its own system prompt
        text, v = _text_and_video(m["content"] if m["content"] is not None else "", where)
        if v is not None:
            if role != "user" or any(r == "user" for r, _ in turns):
                raise ApiError(400, f"{v[1]}: the video goes in the first user message")
            video = v
        want = "user" if len(turns) % 2 == 0 else "assistant"
        if role != want:
            raise ApiError(400, f"{where}: expected a {want} message (user and assistant messages alternate, "
                                "starting and ending with user)")
        turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must be a user message (the question)")
    if video is None:
        raise ApiError(400, "no video: give one in the first user message as a content part "
                            "{\"type\": \"video_url\", \"video_url\": {\"url\": \"file:///abs/clip.mp4\"}}")
    question = turns[-1][1]
    if not question.strip():
        raise ApiError(400, f"messages[{len(messages) - 1}]: the question is empty")
    history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]
    return video, history, question


# ------------------------------------------------------------------------------------------------ the app
def create_app(engine, *, max_upload_bytes: int, upload_dir: str):
    """The FastAPI app around ``engine`` (:class:`experiments.engine.Engine`); videos uploaded or sent inline are
    stored under ``upload_dir``, none larger than ``max_upload_bytes``."""
    from fastapi import FastAPI, Request  # noqa: PLC0415
    from fastapi.exceptions import RequestValidationError  # noqa: PLC0415
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse  # noqa: PLC0415
    from starlette.concurrency import run_in_threadpool  # noqa: PLC0415
    from starlette.exceptions import HTTPException  # noqa: PLC0415

    from vjax.data.video import UnreadableVideo, read_frames  # noqa: PLC0415
    from vjax.generate import ContextOverflow  # noqa: PLC0415

    app = FastAPI(title="vjax", docs_url=None, redoc_url=None, openapi_url=None)
    videos = Videos(upload_dir, max_upload_bytes)
    json_limit = max_upload_bytes * 4 // 3 + JSON_SLACK

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return _error(err.status, err.message, err.kind)

    @app.exception_handler(HTTPException)
    async def _http_error(request, err: HTTPException):
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, err: RequestValidationError):
        first = (err.errors() or [{}])[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}")

    def unreadable(err: UnreadableVideo) -> ApiError:
        if err.kind in ("missing", "not_a_file", "empty"):  # a wrong path: nothing to re-encode
            return ApiError(400, f"{err} (on the server's disk; upload a video with POST /v1/videos)")
        return ApiError(400, f"{err} (re-encode it, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)")

    async def json_body(request: Request) -> dict:
        raw = await _read_limited(request, json_limit, "request body")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ApiError(400, f"malformed JSON body: {err}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    # ---------------------------------------------------------------- plain endpoints
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "vjax"}]}

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/v1/clips")
    async def clips():  # in a thread: the first call may generate the synthetic set
        paths = await run_in_threadpool(engine.clips)
        return {"data": [{"name": os.path.basename(p), "video": os.path.abspath(p)} for p in paths]}

    @app.post("/v1/videos")
    async def upload(request: Request):
        limited = Request(request.scope, receive=_limited_receive(request, max_upload_bytes + JSON_SLACK, "upload"))
        try:
            form = await limited.form(max_files=1, max_fields=8)
        except ApiError:
            raise
        except Exception as err:  # the multipart parser's errors
            raise ApiError(400, f"malformed upload (multipart/form-data with a 'file' field): {err}") from None
        f = form.get("file")
        if f is None or isinstance(f, str):
            raise ApiError(400, "the upload has no file: send multipart/form-data with a 'file' field")
        data = await f.read()
        name = os.path.basename(f.filename or "video")
        if len(data) > max_upload_bytes:
            raise ApiError(413, f"{name}: {_mb(len(data))} is over the limit of {_mb(max_upload_bytes)} "
                                "(--max_upload_mb)")
        if not data:
            raise ApiError(400, f"{name}: the file is empty")
        path = videos.store(data, _suffix(name))
        try:
            await run_in_threadpool(read_frames, path, [0])  # the first frame decodes
        except UnreadableVideo as err:
            os.remove(path)
            raise ApiError(400, f"{name} is not a readable video: {err.reason}") from None
        return {"video": path, "name": name}

    @app.post("/v1/frames")
    async def frames(request: Request):
        body = await json_body(request)
        path = videos.resolve(body.get("video"), "video")
        try:
            images, stamps = await run_in_threadpool(engine.frames, path)
        except UnreadableVideo as err:
            raise unreadable(err) from None
        jpegs = await run_in_threadpool(lambda: [_jpeg(x) for x in images])
        return {"frames": jpegs, "timestamps": [round(float(t), 3) for t in stamps]}

    class _EventStream(StreamingResponse):
        """A stream whose ``on_close`` runs however it ends (finished, cancelled, or the client's socket gone)."""

        def __init__(self, content, *, on_close, **kw):
            super().__init__(content, **kw)
            self.on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.on_close()

    # ---------------------------------------------------------------- chat completions
    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        body = await json_body(request)
        if "messages" not in body:
            raise ApiError(400, "the body has no messages")
        (ref, at), history, question = parse_messages(body["messages"])
        cap = engine.max_new_tokens
        mt = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = min(_number({"max_tokens": mt}, "max_tokens", cap, 1, 1 << 30, integer=True), cap)
        temperature = float(_number(body, "temperature", 0.0, 0.0, 2.0))
        top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True))
        seed = _number(body, "seed", 0, -(1 << 63), (1 << 63) - 1, integer=True)
        if _number(body, "n", 1, 1, 1, integer=True) != 1:
            raise ApiError(400, "n must be 1")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, f"stream must be true or false, got {json.dumps(stream)[:40]}")
        opts = body.get("stream_options") or {}
        include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
        path = videos.resolve(ref, at)
        try:
            prepared = await run_in_threadpool(engine.prepare, path, history, question)
        except UnreadableVideo as err:
            raise unreadable(err) from None
        except ValueError as err:
            raise ApiError(400, str(err)) from None

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:  # on the engine's thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop has closed: the server is gone
                pass

        try:
            ticket = engine.submit(prepared, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                   on_text=lambda piece: put(("text", piece)),
                                   on_done=lambda reason, usage: put(("done", reason, usage)))
        except ContextOverflow as err:
            raise ApiError(400, f"{err}: shorten the conversation or lower max_tokens") from None
        except ValueError as err:  # a sampling value the engine refuses
            raise ApiError(400, str(err)) from None
        except RuntimeError as err:  # the engine is closed: the server is stopping
            raise ApiError(503, str(err), "server_error") from None
        state = {"done": False}

        def cancel() -> None:
            if not state["done"]:
                state["done"] = True
                ticket.cancel()

        checked = [time.monotonic()]

        async def next_item():
            """The engine's next event; None once the client has gone (the ticket is then cancelled). The client
            is looked for every ``POLL_S`` seconds, whether the engine is quiet or busy."""
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), POLL_S)
                except asyncio.TimeoutError:
                    item = None
                if time.monotonic() - checked[0] >= POLL_S:
                    checked[0] = time.monotonic()
                    if await request.is_disconnected():
                        cancel()
                        return None
                if item is not None:
                    return item

        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": engine.name}

        if not stream:
            pieces = []
            try:
                while True:
                    item = await next_item()
                    if item is None:
                        return JSONResponse({}, status_code=499)  # nobody reads it
                    if item[0] == "text":
                        pieces.append(item[1])
                        continue
                    state["done"] = True
                    _, reason, usage = item
                    break
            finally:
                cancel()  # a no-op once done; frees the slot if this handler is cancelled
            if reason == "error":
                return _error(500, "the engine failed while decoding this request (see the server's log)",
                              "server_error")
            if reason == "cancelled":
                return _error(503, "the request was cancelled: the server is shutting down", "server_error")
            usage = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
            return {**base, "object": "chat.completion", "usage": usage,
                    "choices": [{"index": 0, "finish_reason": reason, "logprobs": None,
                                 "message": {"role": "assistant", "content": "".join(pieces)}}]}

        def chunk(delta: dict, reason: str | None = None, **extra) -> str:
            c = {**base, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}], **extra}
            return f"data: {json.dumps(c)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    item = await next_item()
                    if item is None:
                        return
                    if item[0] == "text":
                        yield chunk({"content": item[1]})
                        continue
                    state["done"] = True
                    _, reason, usage = item
                    yield chunk({}, reason)
                    if include_usage:
                        u = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
                        last = {**base, "object": "chat.completion.chunk", "choices": [], "usage": u}
                        yield f"data: {json.dumps(last)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
            finally:
                cancel()

        return _EventStream(events(), on_close=cancel, media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _jpeg(frame) -> str:
    """An ``[H, W, 3]`` uint8 frame -> a JPEG data URL (at most 320 px on its long side)."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    img = Image.fromarray(np.asarray(frame, dtype=np.uint8))
    if max(img.size) > 320:
        img.thumbnail((320, 320))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------------------ command
def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        cli.fail(f"cannot listen on {host}:{port}: {err.strerror or err}: choose another --port or --host")
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str]) -> int:
    cli.start_checkpoint_command(argv, "workdir")
    for name in ("slots", "max_new_tokens", "max_upload_mb"):
        if getattr(FLAGS, name) < 1:
            cli.fail(f"--{name}={getattr(FLAGS, name)} must be at least 1")
    if FLAGS.max_context < 0:
        cli.fail(f"--max_context={FLAGS.max_context} must be 0 (the model's) or a number of tokens")
    if not 0 <= FLAGS.port < 65536:
        cli.fail(f"--port={FLAGS.port} is not a port number (0-65535)")
    sock = _listen(FLAGS.host, FLAGS.port)  # before the model loads: a port in use fails at once

    import uvicorn  # noqa: PLC0415

    from experiments.engine import Engine  # noqa: PLC0415
    from vjax.pretrained import NotACheckpoint  # noqa: PLC0415

    try:
        run = config.load_run_from_flags()
    except (NotACheckpoint, config.ConfigError) as err:
        cli.fail(str(err))
    if run.quantize:
        print(run.describe_weights(), flush=True)
    try:
        engine = Engine(run, slots=FLAGS.slots, max_context=FLAGS.max_context, max_new_tokens=FLAGS.max_new_tokens)
    except ValueError as err:
        cli.fail(str(err))
    upload_dir = FLAGS.upload_dir or tempfile.mkdtemp(prefix="vjax-serve-")
    try:
        app = create_app(engine, max_upload_bytes=FLAGS.max_upload_mb << 20, upload_dir=upload_dir)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"serving {engine.name} on http://{shown}:{port}/ ({FLAGS.slots} slots; Ctrl-C stops)", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
