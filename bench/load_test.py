"""Load test of ``blip2 serve`` on loopback: throughput and latency, batching on versus off.

    python bench/load_test.py --model bench/checkpoints/small            # the small real-shaped checkpoint
    python bench/load_test.py --model CKPT --clients 1,8 --requests 16 --duration 60

For each server setting (``--max-batch 1``: batching off; ``--max-batch`` = the client count: on) a
server is started in a subprocess (``python -m blip2 serve``), warmed up, and then N client threads
each send greedy chat completions (one image, ``--max-tokens`` new tokens; the model may stop earlier
at EOS) back to back over keep-alive connections until ``--requests`` per level are answered or
``--duration`` seconds pass. Reported per level: requests/s, generated tokens/s, p50 / p99 latency,
failures, and the mean rows per forward pass (from /metrics). The queue (``--max-queue``) is at least
the client count, so every failure counts as one. The server is stopped with SIGTERM and must exit 0.

``--readme`` replaces this script's section of bench/README.md (between its markers; ``--note``
adds a paragraph under the table), never appending a second one.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MARK_START, MARK_END = "<!-- load_test:start -->", "<!-- load_test:end -->"
PROMPTS = ["what is in the picture?", "what colour is it?", "how many are there?", "where is it?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_images(n: int, size: int = 224, seed: int = 0) -> list[str]:
    """``n`` distinct random images as JPEG data URIs (more than the server's prefix cache holds,
    so that every request runs the vision encoder)."""
    rng = np.random.default_rng(seed)
    urls = []
    for _ in range(n):
        arr = np.clip(rng.integers(0, 256, size=3) + rng.normal(0, 50, (size, size, 3)), 0, 255).astype(
            np.uint8
        )
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, "JPEG", quality=90)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


class ServerProcess:
    def __init__(self, args: argparse.Namespace, max_batch: int, max_queue: int):
        self.port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "blip2",
            "serve",
            "--model",
            str(args.model),
            "--device",
            args.device,
            "--port",
            str(self.port),
            "--max-batch",
            str(max_batch),
            "--max-queue",
            str(max_queue),
            "--served-model-name",
            "bench",
            "--log-level",
            "warning",
            "--batch-wait-ms",
            str(args.batch_wait_ms),
            "--max-output-tokens",
            str(max(args.max_tokens, 1)),
            "--request-timeout",
            str(args.request_timeout),
        ]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, env=env)
        deadline = time.time() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode} while starting")
            try:
                status, _ = request(self.port, "GET", "/health", timeout=2)
                if status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.proc.kill()
                raise SystemExit("the server did not start within 300 s")
            time.sleep(0.2)

    def metrics(self) -> dict[str, float]:
        _, text = request(self.port, "GET", "/metrics")
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


def request(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    timeout: float = 600,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, str]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
    resp = conn.getresponse()
    data = resp.read().decode("utf-8", "replace")
    if own:
        conn.close()
    return resp.status, data


def chat_body(url: str, prompt: str, max_tokens: int) -> bytes:
    message = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}],
    }
    return json.dumps(
        {"model": "bench", "messages": [message], "temperature": 0, "max_tokens": max_tokens}
    ).encode()


_NEXT = [0]  # where the next level starts in the cycle of bodies


def run_level(port: int, clients: int, bodies: list[bytes], total: int, duration: float) -> dict:
    """``clients`` threads sending back to back until ``total`` answers or ``duration`` seconds."""
    start = _NEXT[0]
    _NEXT[0] += total
    lock = threading.Lock()
    latencies: list[float] = []
    tokens = [0]
    failures: list[str] = []
    sent = [0]
    stop_at = time.perf_counter() + duration

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=duration + 600)
        while True:
            with lock:
                if sent[0] >= total or time.perf_counter() > stop_at:
                    break
                body = bodies[(start + sent[0]) % len(bodies)]
                sent[0] += 1
            t0 = time.perf_counter()
            try:
                status, text = request(port, "POST", "/v1/chat/completions", body, conn=conn)
            except (OSError, http.client.HTTPException) as e:
                status, text = 0, str(e)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=duration + 600)
            dt = time.perf_counter() - t0
            with lock:
                if status == 200:
                    latencies.append(dt)
                    tokens[0] += json.loads(text)["usage"]["completion_tokens"]
                else:
                    failures.append(f"{status}: {text[:200]}")
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(lat),
        "failed": len(failures),
        "failures": failures[:5],
        "seconds": wall,
        "req_per_s": len(lat) / wall,
        "tokens_per_s": tokens[0] / wall,
        "p50_s": statistics.median(lat) if lat else None,
        "p99_s": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))] if lat else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder (e.g. bench/checkpoints/small)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels (default 1,8,32)")
    ap.add_argument("--requests", type=int, default=64, help="answers per level at most (default 64)")
    ap.add_argument(
        "--min-rounds",
        type=int,
        default=2,
        help="at least this many requests per client per level (default 2)",
    )
    ap.add_argument("--duration", type=float, default=120.0, help="seconds per level at most (default 120)")
    ap.add_argument("--max-tokens", type=int, default=20)
    ap.add_argument("--batch-wait-ms", type=float, default=10.0)
    ap.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="the server's per-request timeout (default 600 s)",
    )
    ap.add_argument("--images", type=int, default=160, help="distinct images cycled through (default 160)")
    ap.add_argument("--modes", default="off,on", help="off: --max-batch 1; on: --max-batch = clients")
    ap.add_argument("--readme", action="store_true", help="write the results into bench/README.md")
    ap.add_argument("--note", default="", help="a paragraph to put under the table (--readme)")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON results (default bench/results/load-<time>.json)"
    )
    args = ap.parse_args()
    load = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    levels = [int(c) for c in args.clients.split(",")]
    modes = args.modes.split(",")
    images = make_images(args.images)
    bodies = [chat_body(u, PROMPTS[i % len(PROMPTS)], args.max_tokens) for i, u in enumerate(images)]

    results = []
    # One server per (mode, batch size): "on" serves each level with --max-batch = its client count.
    settings = []
    for mode in modes:
        if mode == "off":
            settings.append(("off", 1, levels))
        else:
            settings += [("on", c, [c]) for c in levels if c > 1]
    for mode, max_batch, mode_levels in settings:
        server = ServerProcess(args, max_batch=max_batch, max_queue=max(64, 2 * max(levels)))
        try:
            # warm-up (first-call costs and each batch shape stay out of the numbers)
            warm = max_batch
            run_level(server.port, warm, bodies[-2 * warm :], 2 * warm, args.duration)
            for clients in mode_levels:
                before = server.metrics()
                total = max(args.requests, clients * args.min_rounds)
                r = run_level(server.port, clients, bodies, total, args.duration)
                after = server.metrics()
                key_sum, key_count = (
                    'blip2_batch_rows_sum{kind="generate"}',
                    'blip2_batch_rows_count{kind="generate"}',
                )
                passes = after.get(key_count, 0) - before.get(key_count, 0)
                r["mean_batch_rows"] = (
                    (after.get(key_sum, 0) - before.get(key_sum, 0)) / passes if passes else None
                )
                r.update(mode=mode, max_batch=max_batch)
                results.append(r)
                print(_row(r), flush=True)
        finally:
            code = server.stop()
            print(f"server (max-batch {max_batch}) stopped with SIGTERM: exit {code}", flush=True)
            if code != 0:
                raise SystemExit(f"the server exited with {code} on SIGTERM")

    summary = _summary(results)
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "device": args.device,
            "load_average_at_start": load,
        },
        "max_tokens": args.max_tokens,
        "results": results,
        "speedup_at_8_over_best_off": summary,
    }
    out = args.out or ROOT / "bench" / "results" / f"load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = _table(results)
    print(table)
    if summary is not None:
        print(f"batching speed-up at 8 clients (over the best level without): {summary:.2f}x")
    print(f"wrote {out}")
    if args.readme:
        _write_readme(args, table, summary, load, os.getloadavg()[0])


def _row(r: dict) -> str:
    p50 = f"{r['p50_s']:.2f}" if r["p50_s"] is not None else "-"
    p99 = f"{r['p99_s']:.2f}" if r["p99_s"] is not None else "-"
    rows = f"{r['mean_batch_rows']:.1f}" if r.get("mean_batch_rows") else "-"
    return (
        f"| {r['mode']} | {r['max_batch']} | {r['clients']} | {r['requests']} | {r['req_per_s']:.2f} | "
        f"{r['tokens_per_s']:.1f} | {p50} | {p99} | {rows} | {r['failed']} |"
    )


def _table(results: list[dict]) -> str:
    head = (
        "| batching | --max-batch | clients | answered | req/s | tokens/s | p50 s | p99 s | rows/pass | failed |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([head, *(_row(r) for r in results)])


def _summary(results: list[dict]) -> float | None:
    """Requests/s with batching at 8 clients over the best level without it. Without batching the
    server does the same one-at-a-time work whatever the client count, so its best level is the
    fair baseline (a lower one only shows a busier moment of a shared machine)."""
    off = [r["req_per_s"] for r in results if r["mode"] == "off" and r["req_per_s"]]
    on = [r for r in results if r["mode"] == "on" and r["clients"] == 8]
    if off and on:
        return on[0]["req_per_s"] / max(off)
    return None


def _write_readme(
    args: argparse.Namespace, table: str, speedup: float | None, load: float, end_load: float
) -> None:
    path = ROOT / "bench" / "README.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    command = (
        f"python bench/load_test.py --model {args.model} --device {args.device} --clients {args.clients} "
        f"--requests {args.requests} --duration {args.duration:g} --max-tokens {args.max_tokens}"
    )
    lines = [
        MARK_START,
        "## Serving load test (`bench/load_test.py`)",
        "",
        "Written by `bench/load_test.py --readme`, which replaces this section (between its markers) on",
        "each run. Greedy chat completions, one distinct 224 px JPEG each (more images than the prefix",
        "cache holds), from N client threads back to back over keep-alive loopback connections; `off` =",
        "`--max-batch 1`, `on` = `--max-batch N`; one warm-up round per server; rows/pass = mean rows",
        "per forward pass. The queue is above the client count, so any failed request is a bug.",
        "",
        f"`{command}`: {platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f} when it",
        f"started, {time.strftime('%Y-%m-%d')}.",
        "",
        table,
        "",
    ]
    if speedup is not None:
        lines.append(
            f"Batching speed-up at 8 clients: **{speedup:.2f}x** (requests per second, against the best"
            f" level without batching); load average {end_load:.1f} at the end."
        )
    if args.note:
        lines += ["", args.note]
    lines.append(MARK_END)
    path.write_text(replace_section(text, "\n".join(lines)))


def replace_section(text: str, section: str) -> str:
    """``text`` with this script's marked section replaced by ``section`` (markers included), and
    any further marked sections (left by older versions that appended) removed; at the end when
    there is none."""
    parts, kept, rest = [], False, text
    while MARK_START in rest:
        before, after = rest.split(MARK_START, 1)
        if MARK_END not in after:
            raise SystemExit(f"{MARK_START} without {MARK_END} in bench/README.md: mend it by hand")
        parts.append(before if not kept else before.lstrip("\n"))
        if not kept:
            parts.append(section)
            kept = True
        rest = after.split(MARK_END, 1)[1]
    if not kept:
        return text.rstrip("\n") + "\n\n" + section + "\n"
    return "".join(parts) + rest


if __name__ == "__main__":
    main()
