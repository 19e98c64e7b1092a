"""The server under load: batched against one-at-a-time, and a soak with clients that walk away.

    python benchmarks/server.py                       # the demo model: 1, 2, 4, 8 clients, then the soak
    python benchmarks/server.py --model .cache/bench/bench-l6-s0 --clients 1,4 --requests-per-client 1 \\
        --max-tokens 256 --steps 8 --no-soak            # the bench checkpoint (run it under flock /tmp/heavy.lock)

Two servers run as child processes on the same model: one batching (`--max-concurrency` = the most clients) and
one serving a request at a time (`--max-concurrency 1`: the others queue), which is what every other Mac
DiffusionGemma server does. For each number of clients, each client sends its requests one after another
(streaming, with the usage chunk) to each server in turn. Measured per level: aggregate completion tokens per
second (all clients' tokens / wall time), time to first committed text p50/p95, the decoder passes the server
ran (each one denoising step over its whole batch: the work, whatever else loads the machine), the server's peak
RSS (sampled every 50 ms from /proc) and MLX peak memory (/health), and /proc/loadavg before and after. The ratio
column is batched / one at a time.

The soak: `--soak-requests` requests from `--soak-clients` clients against the batching server; each request is
abandoned after its first chunk with probability `--disconnect-rate`. Every request must end answered or cleanly
cancelled, the server must go idle, and memory and time to first text must not grow (first vs last quarter).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402


def demo_prompts(n: int, seed: int = 0) -> list[str]:
    """The demo model's four tasks with random operands."""
    rng = random.Random(seed)
    words = ["diffuse", "canvas", "gemma", "window", "tensor", "kernel", "sample", "stream"]
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append("sort " + " ".join(str(rng.randrange(10)) for _ in range(rng.randrange(4, 9))))
        elif kind == 1:
            out.append("reverse " + rng.choice(words))
        elif kind == 2:
            out.append(f"add {rng.randrange(10, 100)}+{rng.randrange(10, 100)}")
        else:
            out.append("sudoku .2.3 .... 2.3. .4.2")
    return out


class Server:
    """`python -m mlx_dgemma.server` in a child process, with its RSS sampled."""

    def __init__(self, model, port: int, max_concurrency: int, extra=()):
        argv = [sys.executable, "-m", "mlx_dgemma.server", "--port", str(port), "--max-concurrency",
                str(max_concurrency), "--max-queue", "64", "--log-level", "warning", *extra]
        if model:
            argv += ["--model", str(model)]
        env = common.openblas_env()
        env["PYTHONPATH"] = str(common.REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.peak_rss = 0.0
        self._sampling = False
        deadline = time.time() + 600
        import httpx2 as httpx

        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def sample(self):
        """Start sampling RSS; returns a function that stops and gives the peak (MiB)."""
        peak = [self.rss_mb()]
        stop = threading.Event()

        def run():
            while not stop.wait(0.05):
                peak[0] = max(peak[0], self.rss_mb())

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return lambda: (stop.set(), t.join(), peak[0])[2]

    def health(self) -> dict:
        import httpx2 as httpx

        return httpx.get(self.url + "/health", timeout=10).json()

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def one_request(url: str, body: dict, abandon: bool = False, timeout: float = 600) -> dict:
    """A streaming chat request; returns its outcome, tokens and time to first committed text."""
    import httpx2 as httpx

    start = time.perf_counter()
    out = {"outcome": "lost", "tokens": 0, "ttft": None, "seconds": None}
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                r.read()
                out["outcome"] = "429" if r.status_code == 429 else f"http {r.status_code}"
                return out
            finish = None
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    out["outcome"] = "answered" if finish else "no finish"
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out["outcome"] = "error"
                    break
                if chunk.get("usage"):
                    out["tokens"] = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices", []):
                    delta = c.get("delta", {})
                    if (delta.get("content") or delta.get("reasoning_content")) and out["ttft"] is None:
                        out["ttft"] = time.perf_counter() - start
                    finish = c.get("finish_reason") or finish
                if abandon and chunk.get("choices"):
                    out["outcome"] = "cancelled"
                    break  # leaving the `with` closes the connection mid-stream
    except httpx.HTTPError as e:
        out["outcome"] = f"lost ({type(e).__name__})"
    out["seconds"] = time.perf_counter() - start
    return out


def run_clients(url: str, bodies: list[list[dict]]) -> tuple[list[dict], float]:
    """Client i sends bodies[i] one after another; all clients at once. Returns the results and wall time."""
    results: list[list[dict]] = [[] for _ in bodies]

    def client(i):
        for body in bodies[i]:
            results[i].append(one_request(url, body))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for rs in results for r in rs], time.perf_counter() - start


def pct(values, q):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def body_for(prompt: str, seed: int, args) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": args.max_tokens}
    if args.steps:
        body["steps"] = args.steps
    if args.sampler:
        body["sampler"] = args.sampler
    return body


def concurrency_table(args, batched: Server, serial: Server) -> list[dict]:
    rows = []
    for k in args.clients:
        prompts = demo_prompts(k * args.requests_per_client, seed=k)
        bodies = [[body_for(prompts[i * args.requests_per_client + j], 100 * k + i * 10 + j, args)
                   for j in range(args.requests_per_client)] for i in range(k)]
        row = {"clients": k}
        for name, server in (("batched", batched), ("serial", serial)):
            steps_before = server.health()["steps_run"]
            load = common.loadavg()
            stop = server.sample()
            results, wall = run_clients(server.url, bodies)
            rss = stop()
            health = server.health()
            bad = [r["outcome"] for r in results if r["outcome"] != "answered"]
            if bad:
                raise RuntimeError(f"{name} with {k} clients: not answered: {bad}")
            tokens = sum(r["tokens"] for r in results)
            row[name] = {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall,
                         "ttft_p50": pct([r["ttft"] for r in results], 0.5),
                         "ttft_p95": pct([r["ttft"] for r in results], 0.95),
                         "peak_rss_mb": rss, "mlx_peak_gb": health["memory_gb"]["peak"],
                         "decoder_passes": health["steps_run"] - steps_before, "loadavg": [load, common.loadavg()]}
        row["speedup"] = row["batched"]["tok_s"] / row["serial"]["tok_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def soak(args, server: Server) -> dict:
    rng = random.Random(7)
    prompts = demo_prompts(args.soak_requests, seed=99)
    plan = [(body_for(p, 1000 + i, args), rng.random() < args.disconnect_rate) for i, p in enumerate(prompts)]
    lock, nxt, results = threading.Lock(), [0], [None] * len(plan)
    warm = [one_request(server.url, plan[i][0]) for i in range(4)]  # first allocations, not growth
    assert all(w["outcome"] == "answered" for w in warm)
    before = {"rss_mb": server.rss_mb(), "mlx_active_gb": server.health()["memory_gb"]["active"]}

    def client():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(plan):
                return
            body, abandon = plan[i]
            results[i] = {**one_request(server.url, body, abandon=abandon), "abandon": abandon,
                          "finished_at": time.perf_counter()}

    threads = [threading.Thread(target=client) for _ in range(args.soak_clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    deadline = time.time() + 60
    while time.time() < deadline:
        h = server.health()
        if h["running"] == 0 and h["queued"] == 0:
            break
        time.sleep(0.1)
    after = {"rss_mb": server.rss_mb(), "mlx_active_gb": h["memory_gb"]["active"]}
    outcomes: dict[str, int] = {}
    for r in results:
        key = "missing" if r is None else r["outcome"]
        outcomes[key] = outcomes.get(key, 0) + 1
    answered = sorted((r for r in results if r and r["outcome"] == "answered"), key=lambda r: r["finished_at"])
    quarter = max(1, len(answered) // 4)
    return {"requests": len(plan), "clients": args.soak_clients, "wall_s": wall, "outcomes": outcomes,
            "abandoned_planned": sum(a for _, a in plan), "idle_after": h["running"] == 0 and h["queued"] == 0,
            "health": h["status"], "memory_before": before, "memory_after": after,
            "ttft_first_quarter_p50": pct([r["ttft"] for r in answered[:quarter]], 0.5),
            "ttft_last_quarter_p50": pct([r["ttft"] for r in answered[-quarter:]], 0.5),
            "seconds_first_quarter_p50": pct([r["seconds"] for r in answered[:quarter]], 0.5),
            "seconds_last_quarter_p50": pct([r["seconds"] for r in answered[-quarter:]], 0.5)}


def print_table(rows):
    print("| clients | batched tok/s | one-at-a-time tok/s | ratio | TTFT p50 / p95 batched (s) | "
          "TTFT p50 / p95 one-at-a-time (s) | decoder passes batched / one | peak RSS batched / one (MB) | "
          "MLX peak (GB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b, s = r["batched"], r["serial"]
        print(f"| {r['clients']} | {b['tok_s']:.1f} | {s['tok_s']:.1f} | {r['speedup']:.2f}x | "
              f"{b['ttft_p50']:.3f} / {b['ttft_p95']:.3f} | {s['ttft_p50']:.3f} / {s['ttft_p95']:.3f} | "
              f"{b['decoder_passes']} / {s['decoder_passes']} | "
              f"{b['peak_rss_mb']:.0f} / {s['peak_rss_mb']:.0f} | {b['mlx_peak_gb']:.3f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (default: the bundled demo model)")
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--requests-per-client", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--steps", type=int, help="denoising steps per canvas (default: the model's)")
    p.add_argument("--sampler", help="sampler body field (e.g. fast)")
    p.add_argument("--soak", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--soak-requests", type=int, default=200)
    p.add_argument("--soak-clients", type=int, default=16)
    p.add_argument("--disconnect-rate", type=float, default=0.25)
    p.add_argument("--port", type=int, default=8490)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)

    gemm = common.print_gemm_rate()
    info = {"machine": common.machine_info(), "gemm": gemm, "model": args.model or "demo", "args": vars(args)}
    batched = Server(args.model, args.port, max(args.clients))
    serial = Server(args.model, args.port + 1, 1)
    try:
        rows = concurrency_table(args, batched, serial)
    finally:
        serial.close()
    try:
        soak_result = soak(args, batched) if args.soak else None
    finally:
        batched.close()
    print()
    print_table(rows)
    if soak_result:
        print()
        print("soak:", json.dumps(soak_result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({**info, "rows": rows, "soak": soak_result}, indent=1))


if __name__ == "__main__":
    main()
