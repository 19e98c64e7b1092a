"""What an idle two-rank server costs: CPU per rank and for `mlx.launch` while no request comes, and how long the
first request after the idle spell takes against the next ones (the workers sleep in 0.25 s rests while idle).

    python benchmarks/distributed_idle.py [--model FOLDER] [--idle 5] [--mode pipeline|experts-parallel]

Linux only (reads /proc). Without --model, the bundled demo model. Rank 0's and rank 1's CPU seconds come from
/proc/PID/stat over the idle spell; a rank spinning in the ring backend's wait would show about one core's worth.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ranks_of(session: int, module: str = "mlx_dgemma.server") -> dict[int, int]:
    """rank -> pid of the processes of `python -m module` in this session."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or os.getsid(int(entry.name)) != session:
                continue
            if module.encode() not in (entry / "cmdline").read_bytes():
                continue
            for var in (entry / "environ").read_bytes().split(b"\0"):
                if var.startswith(b"MLX_RANK="):
                    found[int(var[9:])] = int(entry.name)
        except OSError:
            continue
    return found


def ask(url: str) -> float:
    import httpx2 as httpx

    start = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", timeout=300,
                   json={"messages": [{"role": "user", "content": "sort 7 2 9 4 1"}], "seed": 1, "max_tokens": 16})
    r.raise_for_status()
    return time.perf_counter() - start


def main():
    import httpx2 as httpx

    from mlx_dgemma.distributed import free_starting_port

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model")
    p.add_argument("--idle", type=float, default=5.0, help="Seconds of idle spell measured.")
    p.add_argument("--mode", default="pipeline", choices=["pipeline", "experts-parallel"])
    a = p.parse_args()
    port = free_starting_port(1)  # one free port for HTTP
    launch = str(Path(sys.executable).parent / "mlx.launch")
    cmd = [launch, "-n", "2", "--backend", "ring", "--starting-port", str(free_starting_port()), "--", sys.executable,
           "-m", "mlx_dgemma.server", "--port", str(port), f"--{a.mode}", "--log-level", "warning",
           *(["--model", a.model] if a.model else [])]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                httpx.get(url + "/health", timeout=2)
                break
            except httpx.HTTPError:
                if proc.poll() is not None:
                    raise SystemExit("the server exited") from None
                time.sleep(0.2)
        warm = [ask(url) for _ in range(2)]  # the first passes compile
        time.sleep(1.0)
        pids = {**ranks_of(proc.pid), "mlx.launch": proc.pid}
        before = {k: cpu_seconds(v) for k, v in pids.items()}
        time.sleep(a.idle)
        idle = {k: cpu_seconds(v) - before[k] for k, v in pids.items()}
        after_idle = ask(url)
        next_ones = [ask(url) for _ in range(3)]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    result = {"mode": a.mode, "idle_seconds": a.idle, "cpu_seconds_idle": {str(k): round(v, 2) for k, v in idle.items()},
              "warmup_requests_s": [round(t, 2) for t in warm], "first_after_idle_s": round(after_idle, 2),
              "next_s": [round(t, 2) for t in next_ones], "load_average": os.getloadavg()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
