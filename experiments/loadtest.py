r"""Load-test a video chat server on loopback: ``python -m experiments.loadtest --workdir=DIR`` (starts
``python -m experiments.serve`` on a free port, stops it at the end) or ``--url=http://HOST:PORT`` (a server
already running).

    --requests=200 --clients=16    requests in all, and how many clients send them at once
    --max_tokens=32                the answer's cap of every request (greedy)
    --slots=16 --max_context=512   decode slots and KV-cache length per slot of the started server
    --videos=a.mp4,b.mp4           clips to ask about (default: the server's synthetic test clips, /v1/clips)
    --alone=16                     distinct requests first answered one at a time (the reference answers and
                                   the one-at-a-time throughput)
    --out=FILE                     the JSON report

``--alone`` distinct requests (request ``k`` asks question ``k mod Q`` about clip ``k mod C``) are first sent one
at a time; then ``--requests`` requests (request ``i`` repeats distinct request ``i mod alone``) from ``--clients``
concurrent clients (streamed: time to first token and the
whole answer are timed). Every answer of the concurrent phase must equal the one-at-a-time answer of the same
request, and none may be lost; otherwise the exit code is 1. Reported: p50/p99 latency and time to first
token, completion tokens/s of both phases and their ratio, CPU-seconds of the server process.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import Any, Iterator

import numpy as np
from absl import flags

from experiments import cli

FLAGS = flags.FLAGS
QUESTIONS = (
    "What colour is the circle?", "How many objects are there?", "Which way does the object move?",
    "What shape is the red object?", "Describe the video.", "When does the square appear?",
    "What colour is the triangle?", "Is the object moving left or right?",
)


def define_flags() -> None:
    flags.DEFINE_string("url", None, "a running server (default: start one with --workdir)")
    flags.DEFINE_string("workdir", None, "checkpoint to serve when no --url is given")
    flags.DEFINE_string("tokenizer", None, "tokenizer directory of a converted checkpoint (passed to the server)")
    flags.DEFINE_integer("requests", 200, "requests in all")
    flags.DEFINE_integer("clients", 16, "concurrent clients")
    flags.DEFINE_integer("slots", 16, "decode slots of the started server")
    flags.DEFINE_integer("max_tokens", 32, "answer cap of every request")
    flags.DEFINE_integer("max_context", 512, "KV-cache length of each slot of the started server (every decode "
                         "step attends over all of it)")
    flags.DEFINE_integer("alone", 16, "distinct requests answered one at a time first")
    flags.DEFINE_list("videos", [], "clips to ask about (default: the server's /v1/clips)")
    flags.DEFINE_string("out", None, "JSON report")


# --------------------------------------------------------------------------------------------- client
def _request(url: str, method: str, path: str, body: dict | None = None, timeout: float = 600) -> tuple[int, Any]:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def chat_body(video: str, question: str, max_tokens: int, stream: bool) -> dict:
    """An OpenAI chat-completions body asking ``question`` about ``video`` (greedy)."""
    return {"model": "vjax", "stream": stream, "max_tokens": max_tokens, "temperature": 0,
            **({"stream_options": {"include_usage": True}} if stream else {}),
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{video}"}},
                                                       {"type": "text", "text": question}]}]}


def _sse_lines(resp) -> Iterator[str]:
    for raw in resp:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.startswith("data: "):
            yield line[6:]


def ask_streaming(url: str, body: dict, timeout: float = 600) -> dict[str, Any]:
    """Send ``body`` with ``stream: true``; the answer, finish reason, completion tokens and timings."""
    u = urllib.parse.urlsplit(url)
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}).encode(),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            return {"error": f"HTTP {r.status}: {r.read()[:300]!r}"}
        pieces, first, reason, usage = [], None, None, None
        for data in _sse_lines(r):
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    first = first if first is not None else time.perf_counter() - t0
                    pieces.append(piece)
                reason = choice.get("finish_reason") or reason
        return {"text": "".join(pieces), "finish_reason": reason, "ttft": first, "latency": time.perf_counter() - t0,
                "completion_tokens": (usage or {}).get("completion_tokens")}
    except (OSError, ValueError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    finally:
        conn.close()


def _pct(xs: list[float], q: float) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.percentile(xs, q)) if xs else None


def _phase(url: str, bodies: list[dict], clients: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda b: ask_streaming(url, b), bodies))
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["completion_tokens"] or 0 for r in ok)
    return {"results": results, "wall_s": wall, "requests": len(bodies), "clients": clients,
            "lost": len(results) - len(ok), "completion_tokens": tokens, "tokens_per_s": tokens / wall,
            "requests_per_s": len(ok) / wall,
            "latency_p50_s": _pct([r["latency"] for r in ok], 50),
            "latency_p99_s": _pct([r["latency"] for r in ok], 99),
            "ttft_p50_s": _pct([r["ttft"] for r in ok], 50), "ttft_p99_s": _pct([r["ttft"] for r in ok], 99)}


def load_test(url: str, videos: list[str], *, requests: int, clients: int, max_tokens: int, alone: int,
              progress=None) -> dict[str, Any]:
    """Run both phases against ``url``; the report (``ok`` is False when an answer was lost or differs)."""
    if not videos:
        raise ValueError("no videos to ask about: pass --videos, or serve a run whose synthetic set has test clips")
    distinct = max(1, min(alone, requests))
    kinds = [chat_body(videos[k % len(videos)], QUESTIONS[k % len(QUESTIONS)], max_tokens, True)
             for k in range(distinct)]
    bodies = [kinds[i % distinct] for i in range(requests)]  # request i repeats distinct request i mod alone
    say = progress or (lambda msg: None)
    say("warming up: one request alone, then two bursts from every client (compiles outside the clock)")
    _phase(url, kinds[:1], 1)
    for _ in range(2):
        _phase(url, bodies[: 2 * clients], clients)
    say(f"one at a time: {distinct} distinct requests")
    single = _phase(url, kinds, 1)
    say(f"concurrent: {requests} requests from {clients} clients")
    many = _phase(url, bodies, clients)
    reference = [r.get("text") for r in single["results"]]
    wrong = [i for i, r in enumerate(many["results"]) if "error" not in r and r["text"] != reference[i % distinct]]
    report = {"url": url, "videos": len(videos), "max_tokens": max_tokens, "alone": single, "concurrent": many,
              "wrong": wrong,
              "throughput_ratio": many["tokens_per_s"] / single["tokens_per_s"] if single["tokens_per_s"] else None}
    report["ok"] = not wrong and many["lost"] == 0 and single["lost"] == 0
    for phase in (single, many):
        phase["errors"] = sorted({r["error"] for r in phase["results"] if "error" in r})[:5]
        del phase["results"]
    return report


def summary(report: dict[str, Any]) -> str:
    """Three lines: both phases and the verdict."""
    def f(x: float | None, unit: str = " s") -> str:
        return "-" if x is None else f"{x:.2f}{unit}"

    a, c = report["alone"], report["concurrent"]
    return "\n".join([
        f"one at a time: {a['requests']} requests in {a['wall_s']:.1f} s, {a['tokens_per_s']:.1f} tokens/s, "
        f"latency p50 {f(a['latency_p50_s'])}",
        f"concurrent:    {c['requests']} requests from {c['clients']} clients in {c['wall_s']:.1f} s, "
        f"{c['tokens_per_s']:.1f} tokens/s, latency p50 {f(c['latency_p50_s'])} p99 {f(c['latency_p99_s'])}, "
        f"first token p50 {f(c['ttft_p50_s'])} p99 {f(c['ttft_p99_s'])}",
        f"throughput x{f(report['throughput_ratio'], '')} of one at a time; lost {c['lost']}, answered differently "
        f"{len(report['wrong'])}; server CPU {f(report.get('server_cpu_s'))}, load {report['loadavg'][0]:.2f}"])


# --------------------------------------------------------------------------------------------- server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started_server(workdir: str, *, slots: int, max_new_tokens: int, max_context: int = 0, tokenizer: str | None = None,
                   extra: tuple[str, ...] = (), timeout: float = 600) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python -m experiments.serve`` on a free loopback port; yields ``(url, process)`` once /health answers."""
    port = _free_port()
    cmd = [sys.executable, "-m", "experiments.serve", f"--workdir={workdir}", f"--port={port}", "--host=127.0.0.1",
           f"--slots={slots}", f"--max_new_tokens={max_new_tokens}", f"--max_context={max_context}", *extra]
    if tokenizer:
        cmd.append(f"--tokenizer={tokenizer}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}: {''.join(log)[-2000:]}")
            with contextlib.suppress(OSError):
                if _request(url, "GET", "/health", timeout=5)[0] == 200:
                    break
            if time.time() > deadline:
                raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s: {''.join(log)[-2000:]}")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}")
    if bool(FLAGS.url) == bool(FLAGS.workdir):
        cli.fail("give exactly one of --url (a running server) and --workdir (a checkpoint to serve)")
    for name in ("requests", "clients", "max_tokens", "alone", "slots", "max_context"):
        if getattr(FLAGS, name) < 1:
            cli.fail(f"--{name} must be >= 1, got {getattr(FLAGS, name)}")

    def say(msg: str) -> None:
        print(f"loadtest: {msg}", file=sys.stderr, flush=True)

    with contextlib.ExitStack() as stack:
        if FLAGS.url:
            url, proc = FLAGS.url.rstrip("/"), None
        else:
            say(f"starting the server on {FLAGS.workdir}")
            url, proc = stack.enter_context(started_server(
                FLAGS.workdir, slots=FLAGS.slots, tokenizer=FLAGS.tokenizer, max_new_tokens=FLAGS.max_tokens,
                max_context=FLAGS.max_context))
        videos = [os.path.abspath(v) for v in FLAGS.videos]
        if not videos:
            status, clips = _request(url, "GET", "/v1/clips")
            videos = [c["video"] for c in (clips or {}).get("data", [])] if status == 200 else []
        cpu0 = _cpu_seconds(proc.pid) if proc else None
        try:
            report = load_test(url, videos, requests=FLAGS.requests, clients=FLAGS.clients,
                               max_tokens=FLAGS.max_tokens, alone=FLAGS.alone, progress=say)
        except ValueError as err:
            cli.fail(str(err))
        if proc is not None and cpu0 is not None:
            report["server_cpu_s"] = _cpu_seconds(proc.pid) - cpu0
    report["loadavg"] = os.getloadavg()
    print(summary(report))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    define_flags()
    cli.run(main)
