"""Two ranks on this machine: `mlx.launch -n 2` over the ring backend on loopback, each run under a timeout.

Rank 0 compares the sharded model with a single-process load of the same tiny reference checkpoint (float32, and
4-bit for expert parallelism): logits, a seeded batched generation, and how much of the weights each rank holds.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mlx_dgemma
from mlx_dgemma.distributed import DistributedError, expert_range, free_starting_port, parse_split, split_layers

HERE = Path(__file__).parent
LAUNCH = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")
TIMEOUT = 120  # seconds per launch: a hung rank fails the test instead of the suite

pytestmark = pytest.mark.distributed


def launch(*args) -> tuple[int, dict | None, str]:
    """Run tests/distributed_run.py on two ranks; (exit code, rank 0's JSON line, all output)."""
    if LAUNCH is None:
        pytest.skip("mlx.launch is not installed")
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(free_starting_port()), "--",
           sys.executable, str(HERE / "distributed_run.py"), *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(Path(mlx_dgemma.__file__).parent.parent)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"two-rank run did not finish in {TIMEOUT}s:\n{out[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return proc.returncode, (json.loads(lines[-1]) if lines else None), out


@pytest.fixture(scope="module")
def tiny_moe(reference_factory):
    # 8 experts, top-4: each rank owns about two of a token's four slots, so summing each rank's share first (the
    # partial sums) associates the four terms differently than one process does, which float32 logits show
    return reference_factory(num_experts=8, top_k_experts=4)[0]


@pytest.fixture(scope="module")
def tiny_moe_q4(tiny_moe, tmp_path_factory):
    # group 32: the tiny model's expert width (32) is one group
    return mlx_dgemma.convert(str(tiny_moe), str(tmp_path_factory.mktemp("dist") / "q4"), quantize=True, q_bits=4,
                              q_group_size=32, verbose=False)


@pytest.fixture(scope="module")
def parity_runs(tiny, tiny_moe, tiny_moe_q4):
    """One two-rank launch: pipeline (float32), experts-parallel (float32 under both backend profiles, i.e. both
    expert layouts, and 4-bit), and the partial-sums variant, each against one process."""
    runs = {"pipeline": f"pipeline:cpu:{tiny[0]}", "experts": f"experts:cpu:{tiny_moe}",
            "experts-gpu-layout": f"experts:gpu:{tiny_moe}", "experts-4bit": f"experts:cpu:{tiny_moe_q4}",
            "experts-partial": f"experts-partial:cpu:{tiny_moe}"}
    code, result, out = launch("parity", *runs.values())
    assert code == 0 and result is not None and result["size"] == 2, out[-3000:]
    return {name: result["runs"][run] for name, run in runs.items()}


def check_generation(run):
    assert run["generated"]["sharded"] == run["generated"]["single"]
    assert all(len(row) > 0 for row in run["generated"]["sharded"])


def test_pipeline_matches_one_process_and_halves_the_layers(parity_runs):
    run = parity_runs["pipeline"]
    assert run["max_abs_diff"] == 0.0  # the same arithmetic in the same order, only split across processes
    check_generation(run)
    assert sum(run["layer_bytes"]) == run["single_layer_bytes"]
    assert all(abs(b / run["single_layer_bytes"] - 0.5) < 0.1 for b in run["layer_bytes"])


@pytest.mark.parametrize("name", ["experts", "experts-gpu-layout", "experts-4bit"])
def test_experts_parallel_matches_one_process_bit_for_bit_and_halves_the_experts(parity_runs, name):
    run = parity_runs[name]
    assert run["max_abs_diff"] == 0.0  # every slot's expert output all-summed with zeros, then one process's sum
    check_generation(run)
    assert run["expert_bytes"] == [run["single_expert_bytes"] // 2] * 2


def test_partial_sums_differ_from_one_process_only_by_rounding(parity_runs):
    # the checkpoint tells the two apart: adding each rank's sum of its slots is not one process's sum
    run = parity_runs["experts-partial"]
    assert 0.0 < run["max_abs_diff"] < 1e-4
    assert run["expert_bytes"] == [run["single_expert_bytes"] // 2] * 2


def test_a_folder_missing_on_one_rank_is_named(tiny):
    code, result, out = launch("missing", tiny[0])
    assert result is not None, out[-3000:]
    assert "rank 1" in result["error"] and "-missing" in result["error"]
    assert "rank 0" not in result["error"]


def test_a_rank_that_dies_ends_the_run_with_a_message(tiny_chat_folder):
    code, result, out = launch("die", tiny_chat_folder)
    # rank 0 either sees the ring fail (and main returns 1) or is stopped by mlx.launch first: a message either way
    assert result in (None, {"code": 1}), out[-3000:]
    assert "error: another rank left the run" in out, out[-3000:]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_that_is_stuck_ends_the_run_with_a_message(tiny_chat_folder, rank, tmp_path):
    # stopped, not killed: its sockets stay open, so the ring backend never fails; the other rank's watchdog
    # (--peer-timeout 3) ends it. The stopped rank is left to the test to kill (mlx.launch cannot stop it).
    if LAUNCH is None:
        pytest.skip("mlx.launch is not installed")
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(free_starting_port()), "--",
           sys.executable, str(HERE / "distributed_run.py"), "stuck", str(rank), str(tiny_chat_folder)]
    env = {**os.environ, "PYTHONPATH": str(Path(mlx_dgemma.__file__).parent.parent)}
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    other = 1 - rank
    expected = f"error: rank {other}: a decoder pass waited more than 3s for the other ranks: one is stuck"
    try:
        deadline = time.time() + TIMEOUT
        while expected not in log.read_text():
            assert time.time() < deadline, "no message from the waiting rank:\n" + log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_layer_split_even_weighted_and_bad():
    assert split_layers(30, 2) == [range(0, 15), range(15, 30)]
    assert split_layers(30, 4) == [range(0, 8), range(8, 16), range(16, 23), range(23, 30)]
    assert split_layers(30, 2, parse_split("2,1")) == [range(0, 20), range(20, 30)]
    assert split_layers(4, 2, [100, 1]) == [range(0, 3), range(3, 4)]  # every rank keeps a layer
    with pytest.raises(DistributedError, match="3 ranks cannot share 2 layers"):
        split_layers(2, 3)
    with pytest.raises(DistributedError, match="--pipeline-split has 3 entries for 2 ranks"):
        split_layers(30, 2, [1, 1, 1])
    with pytest.raises(DistributedError, match="expected comma-separated numbers"):
        parse_split("2;1")


def test_experts_must_divide_among_the_ranks():
    assert expert_range(128, 1, 4) == range(32, 64)
    with pytest.raises(DistributedError, match="128 experts per layer do not divide among 3 ranks"):
        expert_range(128, 0, 3)


# --- the server under mlx.launch ------------------------------------------------------------------------------


def chat_requests(url: str) -> list[dict]:
    """Two seeded chat completions, the second continuing the first's conversation (rank 0's prompt cache holds
    the first prompt, so the second starts from a restored cache state on every rank)."""
    import httpx2 as httpx

    first = [{"role": "user", "content": "hello there"}]
    replies = []
    with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        for messages, seed in ((first, 7), (None, 8)):
            if messages is None:
                messages = first + [{"role": "assistant", "content": replies[0]["text"]},
                                    {"role": "user", "content": "and then"}]
            r = http.post("/v1/chat/completions", json={"messages": messages, "seed": seed, "max_tokens": 40})
            assert r.status_code == 200, r.text
            body = r.json()
            replies.append({"text": body["choices"][0]["message"]["content"],
                            "finish": body["choices"][0]["finish_reason"], "usage": body["usage"]})
    return replies


# Prompts of different lengths and budgets: batched together, rows join (a reframe, a join), leave at different
# canvases (a select) and the frame moves as the longest row goes (a reframe that trims).
BATCH = [("hello", 1, 40), ("why is the sky blue today", 2, 8), ("a", 3, 24), ("the sky is the sky", 4, 16)]


def ask(url: str, text: str, seed: int, max_tokens: int) -> str:
    import httpx2 as httpx

    r = httpx.post(url + "/v1/chat/completions", timeout=TIMEOUT,
                   json={"messages": [{"role": "user", "content": text}], "seed": seed, "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def together(url: str) -> list[str]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(BATCH)) as pool:
        return list(pool.map(lambda request: ask(url, *request), BATCH))


@pytest.fixture(scope="module")
def one_process_replies(tiny_chat_folder):
    from server_fixtures import running_server

    from mlx_dgemma.loading import load

    with running_server(*load(str(tiny_chat_folder)), tiny_chat_folder, max_concurrency=1) as (url, _):
        return {"chat": chat_requests(url), "alone": [ask(url, *request) for request in BATCH]}


@pytest.mark.parametrize("mode", ["pipeline", "experts-parallel"])
def test_the_server_under_mlx_launch_answers_as_one_process(tiny_chat_folder, one_process_replies, mode, tmp_path):
    import httpx2 as httpx
    from server_fixtures import free_port

    if LAUNCH is None:
        pytest.skip("mlx.launch is not installed")
    port = free_port()
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(free_starting_port()), "--",
           sys.executable, "-m", "mlx_dgemma.server", "--model", str(tiny_chat_folder), "--port", str(port),
           f"--{mode}", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(Path(mlx_dgemma.__file__).parent.parent)}
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + TIMEOUT
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                health = httpx.get(url + "/health", timeout=2).json()
                break
            except httpx.HTTPError:
                assert time.time() < deadline, "the two-rank server did not come up:\n" + log.read_text()[-3000:]
                time.sleep(0.2)
        replies = chat_requests(url)
        idle_cpu = worker_cpu_seconds(proc.pid, "mlx_dgemma.server", over=4.0)
        batched = together(url)
        largest_batch = httpx.get(url + "/health", timeout=10).json()["largest_batch"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert replies == one_process_replies["chat"]
    assert replies[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the second request reused the first
    assert batched == one_process_replies["alone"]  # each request as one process answers it alone
    assert largest_batch > 1 and health["max_concurrency"] == 4  # they really shared a batch
    assert "distributed: 2 ranks, --" + mode in log.read_text()
    # with no request, rank 1 sleeps between rank 0's rest announcements (~0.05 s of CPU in 4 s here) instead of
    # spinning in the ring backend's wait for the next header (a whole core, or its share of a loaded machine)
    assert idle_cpu is None or idle_cpu < 0.4, idle_cpu


def test_a_server_that_loses_a_rank_stops_with_a_message(tiny_chat_folder, tmp_path):
    # ranks started by hand (MLX_RANK, MLX_HOSTFILE), so no launcher stops rank 0 for us: it has to notice itself
    import httpx2 as httpx
    from server_fixtures import free_port

    ring = free_starting_port()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{ring + r}"] for r in range(2)]))
    port = free_port()
    cmd = [sys.executable, "-m", "mlx_dgemma.server", "--model", str(tiny_chat_folder), "--port", str(port),
           "--pipeline", "--log-level", "warning"]
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    ranks = []
    for r in range(2):
        env = {**os.environ, "PYTHONPATH": str(Path(mlx_dgemma.__file__).parent.parent), "MLX_RANK": str(r),
               "MLX_HOSTFILE": str(hostfile)}
        with open(logs[r], "w") as out:
            ranks.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))
    try:
        deadline = time.time() + TIMEOUT
        while True:
            assert all(p.poll() is None for p in ranks), logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.HTTPError:
                assert time.time() < deadline, "the server did not come up:\n" + logs[0].read_text()[-3000:]
                time.sleep(0.2)
        assert ask(f"http://127.0.0.1:{port}", "hello", 1, 8) is not None
        ranks[1].kill()
        code = ranks[0].wait(TIMEOUT)  # idle, rank 0 notices at its next rest announcement
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = logs[0].read_text()
    assert code == 1 and "error: the server stops: another rank left the run" in out, out[-3000:]


def worker_cpu_seconds(session: int, module: str, over: float) -> float | None:
    """CPU seconds rank 1 of `python -m module` in this session used in `over` seconds (None without /proc)."""
    from benchmarks.distributed_idle import cpu_seconds, ranks_of

    if not Path("/proc").is_dir():
        return None
    pid = ranks_of(session, module).get(1)
    assert pid is not None, f"rank 1 of {module} not found"
    before = cpu_seconds(pid)
    time.sleep(over)
    return cpu_seconds(pid) - before


def test_the_chat_under_mlx_launch_rests_the_other_rank_at_its_prompt(tiny_chat_folder, tmp_path):
    if LAUNCH is None:
        pytest.skip("mlx.launch is not installed")
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(free_starting_port()), "--",
           sys.executable, "-m", "mlx_dgemma.chat", "--model", str(tiny_chat_folder), "--pipeline", "--seed", "0",
           "-m", "8", "--no-canvas"]
    env = {**os.environ, "PYTHONPATH": str(Path(mlx_dgemma.__file__).parent.parent)}
    log = tmp_path / "chat.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        deadline = time.time() + TIMEOUT
        while "Type a message" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # at the prompt now
        idle_cpu = worker_cpu_seconds(proc.pid, "mlx_dgemma.chat", over=4.0)
        proc.stdin.write(b"hello\nq\n")
        proc.stdin.flush()
        code = proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 0, log.read_text()[-3000:]
    assert "tokens" in log.read_text().split("Type a message", 1)[1]  # the reply's stats line came
    assert idle_cpu is None or idle_cpu < 0.4, idle_cpu  # asleep, not spinning in the ring's wait (see above)


def test_the_distributed_flags_that_need_another_are_refused():
    from argparse import Namespace

    from mlx_dgemma.cli import parallel_mode

    def flags(**kw):
        base = dict(pipeline=False, experts_parallel=False, pipeline_split=None, partial_sums=False, peer_timeout=120.0,
                    adapter_path=None)
        return Namespace(**{**base, **kw})

    assert parallel_mode(flags(experts_parallel=True, partial_sums=True)) == "experts"
    with pytest.raises(ValueError, match="--partial-sums needs --experts-parallel"):
        parallel_mode(flags(pipeline=True, partial_sums=True))
    with pytest.raises(ValueError, match="--peer-timeout must be positive, got 0"):
        parallel_mode(flags(pipeline=True, peer_timeout=0))
