"""``experiments.serve`` over real HTTP (uvicorn on a loopback port, one Engine for the module): OpenAI-format
answers, streamed and not, the page's endpoints, every bad request's 4xx and one-line message (the server then
still answers), and a client that drops its request freeing its slot."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time

import pytest
from PIL import Image

from experiments import loadtest
from tests.serve_common import tiny_checkpoint

import httpx  # the test extra has the serve extra and httpx
import uvicorn

SLOTS, CAP, LIMIT = 2, 200, 1 << 20  # decode slots, the max_tokens cap, the upload limit (bytes)


class Recording:
    """The engine, with every ticket it hands out kept (to see that a dropped request was cancelled), and its
    answers slowed by ``delay`` seconds a piece (so that a request is still decoding when its client leaves)."""

    def __init__(self, engine):
        self.engine, self.tickets, self.delay = engine, [], 0.0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def submit(self, prepared, *, on_text, **kw):
        def slowed(piece):
            time.sleep(self.delay)
            on_text(piece)

        ticket = self.engine.submit(prepared, on_text=slowed, **kw)
        self.tickets.append(ticket)
        return ticket


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from experiments import config
    from experiments.engine import Engine
    from experiments.serve import create_app

    d = tmp_path_factory.mktemp("serve_http")
    paths = tiny_checkpoint(d)
    run = config.load_run(paths["ckpt"], tokenizer=paths["tokenizer"], config=paths["config"])
    engine = Recording(Engine(run, slots=SLOTS, max_context=512, max_new_tokens=CAP))
    app = create_app(engine, max_upload_bytes=LIMIT, upload_dir=str(d / "uploads"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with httpx.Client(base_url=url, timeout=120) as client:
        for _ in range(200):
            if srv.started:
                break
            time.sleep(0.05)
        yield client, engine, paths, url
    srv.should_exit = True
    thread.join(timeout=30)
    engine.close()


def ask(question="What colour is the circle?", video=None, **kw):
    part = {"type": "video_url", "video_url": {"url": f"file://{video}"}} if video else None
    content = [part, {"type": "text", "text": question}] if part else question
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 12, **kw}


def stream(client, body) -> tuple[list[dict], list[str]]:
    """The chunks of a streamed answer and the raw ``data:`` payloads."""
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(x) for x in data[:-1]], data


def good(client, paths) -> str:
    """A good request after a bad one: answered."""
    r = client.post("/v1/chat/completions", json=ask(video=paths["clip"], max_tokens=4))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_health_models_clips_and_the_page(server):
    client, engine, _, _ = server
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [engine.name] == ["chat_univi"]
    clips = client.get("/v1/clips").json()["data"]
    assert [c["name"] for c in clips] == ["000000.mp4", "000001.mp4", "000002.mp4"]
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('id="clip"', 'id="upload"', 'id="frames"', 'id="question"', 'id="ask"', 'id="status"'):
        assert needle in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from outside


def test_streamed_answer_is_the_non_streamed_answer_piece_by_piece(server):
    client, _, paths, _ = server
    body = ask(video=paths["clip"])
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    full = r.json()
    assert full["object"] == "chat.completion" and full["model"] == "chat_univi"
    choice = full["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    usage = full["usage"]
    assert usage["prompt_tokens"] > 16 and 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    chunks, _ = stream(client, {**body, "stream_options": {"include_usage": True}})
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage
    last = chunks[-2]["choices"][0]
    assert last["delta"] == {} and last["finish_reason"] == choice["finish_reason"]
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert len(pieces) >= 2 and all(pieces)  # token by token, not all at once
    assert "".join(pieces) == choice["message"]["content"]

    # the same video as a data: URL, as {"type": "video"}, and a system message (ignored): the same answer
    data = base64.b64encode(open(paths["clip"], "rb").read()).decode()
    inline = {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{data}"}}
    for video in (inline, {"type": "video", "video": paths["clip"]}):
        msgs = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [video, {"type": "text", "text": "What colour is the circle?"}]}]
        r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 12})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == choice["message"]["content"]


def test_a_second_turn_reads_the_first(server):
    client, _, paths, _ = server
    first = ask(video=paths["clip"])
    answer = client.post("/v1/chat/completions", json=first).json()["choices"][0]["message"]["content"]
    body = {**first, "messages": first["messages"] + [{"role": "assistant", "content": answer},
                                                      {"role": "user", "content": "How many objects?"}]}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    one = client.post("/v1/chat/completions", json=ask(video=paths["clip"])).json()
    assert r.json()["usage"]["prompt_tokens"] > one["usage"]["prompt_tokens"] + 4  # the history is in the prompt


def test_upload_frames_and_their_errors(server, tmp_path):
    client, engine, paths, _ = server
    with open(paths["clip"], "rb") as f:
        r = client.post("/v1/videos", files={"file": ("my clip.mp4", f, "video/mp4")})
    assert r.status_code == 200, r.text
    up = r.json()
    assert up["name"] == "my clip.mp4" and up["video"] != paths["clip"]
    frames = client.post("/v1/frames", json={"video": up["video"]}).json()
    want, stamps = engine.frames(paths["clip"])
    assert len(frames["frames"]) == len(want) == len(frames["timestamps"]) and frames["timestamps"] == stamps
    img = Image.open(io.BytesIO(base64.b64decode(frames["frames"][0].split(",", 1)[1])))
    assert img.format == "JPEG" and img.size == (want[0].shape[1], want[0].shape[0])
    # the uploaded path answers a chat request
    r = client.post("/v1/chat/completions", json=ask(video=up["video"], max_tokens=3))
    assert r.status_code == 200, r.text

    cases = [
        ({"files": {"file": ("bad.mp4", b"not a video at all" * 10, "video/mp4")}}, 400, "bad.mp4 is not a readable"),
        ({"files": {"file": ("big.mp4", b"\0" * (LIMIT + 1), "video/mp4")}}, 413, "over the limit of 1.0 MiB"),
        ({"files": {"other": ("x.mp4", b"abc", "video/mp4")}}, 400, "no file"),
        ({"content": b"plain", "headers": {"content-type": "text/plain"}}, 400, "no file"),
    ]
    for kw, status, needle in cases:
        r = client.post("/v1/videos", **kw)
        err = r.json()["error"]
        assert r.status_code == status and needle in err["message"] and "\n" not in err["message"], r.text
    r = client.post("/v1/frames", json={"video": str(tmp_path / "missing.mp4")})
    assert r.status_code == 400 and "file does not exist" in r.json()["error"]["message"]
    good(client, paths)


def _bad_cases(paths, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"definitely not a video" * 20)
    clip = paths["clip"]
    big = base64.b64encode(b"\0" * (LIMIT + 10)).decode()
    video = {"type": "video", "video": clip}
    hi = {"type": "text", "text": "hi"}
    return {
        "malformed_json": (b'{"messages": [', 400, "malformed JSON body"),
        "not_an_object": (b"[1, 2]", 400, "must be a JSON object"),
        "no_messages": ({"max_tokens": 3}, 400, "no messages"),
        "empty_messages": ({"messages": []}, 400, "messages must be a non-empty list"),
        "no_video": (ask(), 400, "no video"),
        "missing_video": (ask(video="/no/such/clip.mp4"), 400, "/no/such/clip.mp4"),
        "unreadable_video": (ask(video=str(bad)), 400, "bad.mp4"),
        "relative_path": ({"messages": [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}, hi]}]},
                          400, "not absolute"),
        "file_url_host": (ask(video="host/clip.mp4"), 400, "names another host"),
        "bad_part": ({"messages": [{"role": "user", "content": [video, "hi"]}]}, 400, "content[1]: unknown"),
        "remote_video": ({"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}, hi]}]}, 400, "POST /v1/videos"),
        "oversized_data_url": ({"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{big}"}}, hi]}]}, 413,
            "over the limit of 1.0 MiB"),
        "oversized_body": ({"messages": [], "pad": "x" * (3 * LIMIT)}, 413, "request body"),
        "context_overflow": (ask("red " * 600, video=clip), 400, "context of 512 tokens"),
        "temperature": (ask(video=clip, temperature=2.5), 400, "temperature=2.5 is out of range"),
        "top_p": (ask(video=clip, top_p=0), 400, "top_p=0 is out of range"),
        "max_tokens": (ask(video=clip, max_tokens="lots"), 400, "max_tokens must be an integer"),
        "bad_role": ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
        "ends_with_assistant": ({"messages": [{"role": "user", "content": [video, hi]},
                                              {"role": "assistant", "content": "a"}]}, 400, "last message"),
        "video_in_second_turn": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                                               {"role": "user", "content": [video]}]}, 400, "first user message"),
        "empty_question": ({"messages": [{"role": "user", "content": [video, {"type": "text", "text": " "}]}]}, 400,
                           "question is empty"),
    }


BAD = ["malformed_json", "not_an_object", "no_messages", "empty_messages", "no_video", "missing_video",
       "unreadable_video", "relative_path", "file_url_host", "bad_part", "remote_video", "oversized_data_url",
       "oversized_body", "context_overflow", "temperature", "top_p", "max_tokens", "bad_role", "ends_with_assistant",
       "video_in_second_turn", "empty_question"]


@pytest.mark.parametrize("case", BAD)
def test_a_bad_request_gets_a_4xx_with_one_line_and_the_server_goes_on(server, tmp_path, case):
    client, _, paths, _ = server
    body, status, needle = _bad_cases(paths, tmp_path)[case]
    if isinstance(body, bytes):
        r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and needle in err["message"], err
    assert "\n" not in err["message"] and len(err["message"]) < 400, err
    good(client, paths)


def test_a_client_that_drops_its_request_frees_the_slot(server):
    client, engine, paths, url = server
    body = ask(video=paths["clip"], max_tokens=CAP)
    before, engine.delay = len(engine.tickets), 0.01  # CAP tokens would take over 2 s
    with httpx.Client(base_url=url, timeout=60) as other:  # streams, each dropped after two pieces
        for _ in range(SLOTS):
            with other.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                lines = r.iter_lines()
                for line in lines:
                    if '"content": "' in line and '"role"' not in line:
                        break
    try:  # and a plain request whose client gives up
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.5)
    except httpx.TimeoutException:
        pass
    dropped = engine.tickets[before:]
    assert len(dropped) == SLOTS + 1
    for t in dropped:
        assert t.done.wait(10), "a dropped request still holds its slot"
    engine.delay = 0.0
    for t in dropped:
        assert t.finish_reason == "cancelled" and len(t.tokens) < CAP, [(x.finish_reason, len(x.tokens))
                                                                         for x in dropped]
    # every slot serves again: SLOTS concurrent requests all complete
    results = [None] * SLOTS

    def one(i):
        results[i] = client.post("/v1/chat/completions", json=ask(video=paths["clip"], max_tokens=6))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(SLOTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None and r.status_code == 200 for r in results), results
    assert len({r.json()["choices"][0]["message"]["content"] for r in results}) == 1  # greedy: the same answer


@pytest.mark.parametrize("case", ["not_a_checkpoint", "port_in_use", "bad_flag"])
def test_the_command_refuses_with_one_line_and_exit_code_2(tmp_path, case):
    import subprocess
    import sys

    from tests.serve_common import ROOT

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    args = {"not_a_checkpoint": [f"--workdir={tmp_path}", "--port=0"],
            "port_in_use": [f"--workdir={tmp_path}", f"--port={taken.getsockname()[1]}"],
            "bad_flag": [f"--workdir={tmp_path}", "--slots=0"]}[case]
    needle = {"not_a_checkpoint": "not a vjax checkpoint", "port_in_use": "cannot listen on 127.0.0.1:",
              "bad_flag": "--slots=0 must be at least 1"}[case]
    r = subprocess.run([sys.executable, "-m", "experiments.serve", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    taken.close()
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr[-2000:]


def test_the_load_test_finds_every_concurrent_answer_equal_to_the_one_alone(server):
    client, engine, paths, url = server
    report = loadtest.load_test(url, [paths["clip"]], requests=12, clients=4, max_tokens=6, alone=4)
    assert report["ok"], report
    single, many = report["alone"], report["concurrent"]
    assert (single["requests"], many["requests"], many["lost"], report["wrong"]) == (4, 12, 0, [])
    assert many["completion_tokens"] > 0 and many["latency_p99_s"] >= many["latency_p50_s"] > 0
    report["loadavg"] = (0.0, 0.0, 0.0)
    assert "lost 0, answered differently 0" in loadtest.summary(report)
    with pytest.raises(ValueError, match="no videos to ask about"):
        loadtest.load_test(url, [], requests=1, clients=1, max_tokens=1, alone=1)
