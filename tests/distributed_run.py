"""What each rank runs in tests/test_distributed.py (started by `mlx.launch -n 2`). Rank 0 prints one JSON line.

    parity MODE:PROFILE:FOLDER...  for each, the sharded model against a single-process load of the folder, in
                         rank 0, under a backend profile (cpu, gpu: the experts' two layouts); MODE is pipeline,
                         experts or experts-partial (each rank's weighted sum all-summed)
    missing FOLDER       rank 1 is given a folder that does not exist
    die FOLDER           rank 1 dies during the first decoder pass of `python -m mlx_dgemma.generate`
    stuck RANK FOLDER    that rank stops itself (SIGSTOP: alive, silent) in the first decoder pass of `generate`
"""

import json
import os
import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

mx.set_default_device(mx.cpu)

from mlx_dgemma import backend  # noqa: E402
from mlx_dgemma.diffusion import generate_tokens  # noqa: E402
from mlx_dgemma.distributed import ShardedModel, load_shard  # noqa: E402
from mlx_dgemma.loading import load_model  # noqa: E402


def part_bytes(model, part: str) -> int:
    """Bytes of this rank's layer weights ("layers") or expert weights ("experts")."""
    return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if k.startswith("layers.") and (part in k or part == "layers"))


def gather_sizes(model):
    """Every rank's (layer, expert) bytes, gathered before rank 0 starts announcing passes."""
    return mx.distributed.all_gather(mx.array([[part_bytes(model, "layers"), part_bytes(model, "experts")]])).tolist()


def parity(*runs):
    """One launch for several (mode, folder) runs: each rank loads its part, the others serve until rank 0 is
    done with that model and closes it, then the next."""
    group = mx.distributed.init()
    results = {}
    for run in runs:
        mode, profile, folder = run.split(":", 2)
        backend.use(profile)
        model = load_shard(folder, group, mode.split("-")[0], exact=not mode.endswith("-partial"))
        sizes = gather_sizes(model)
        if group.rank() != 0:
            model.serve()
            continue
        results[run] = compare(model, load_model(folder), sizes)
        model.close()
    if group.rank() == 0:
        print(json.dumps({"size": group.size(), "runs": results}), flush=True)


def compare(model, single, sizes) -> dict:
    prompt = mx.array([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]])
    canvas = mx.array([list(range(20, 20 + model.args.canvas_length))])
    logits = {}
    for name, m in (("sharded", model), ("single", single)):
        cache = m.make_cache()
        m.encode(prompt, cache)
        mx.eval(cache.state())
        logits[name] = np.array(m.denoise(canvas, cache))
    generated = {
        name: generate_tokens(m, [[3, 4, 5, 6, 7], [8, 9]], max_tokens=24, seed=3)  # a batch, one row padded
        for name, m in (("sharded", model), ("single", single))
    }
    return {
        "max_abs_diff": float(np.abs(logits["sharded"] - logits["single"]).max()),
        "generated": generated,
        "layer_bytes": [row[0] for row in sizes],
        "expert_bytes": [row[1] for row in sizes],
        "single_layer_bytes": part_bytes(single, "layers"),
        "single_expert_bytes": part_bytes(single, "experts"),
    }


def missing(folder):
    rank = int(os.environ.get("MLX_RANK", "0"))
    from mlx_dgemma.cli import load_for_cli

    class Flags:
        pipeline, experts_parallel, pipeline_split, adapter_path = True, False, None, None

    try:
        load_for_cli(folder if rank == 0 else folder + "-missing", None, Flags())
    except ValueError as e:
        print(json.dumps({"error": str(e)}), flush=True)


def die(folder):
    if os.environ.get("MLX_RANK") == "1":
        stage = ShardedModel._stage

        def dying(self, cache, B, L, encode):
            if not encode:
                os._exit(9)
            return stage(self, cache, B, L, encode)

        ShardedModel._stage = dying
    from mlx_dgemma.generate import main

    code = main(["--model", folder, "-p", "hello", "--seed", "0", "--pipeline", "--verbose", "false"])
    print(json.dumps({"code": code}), flush=True)


def stuck(rank, folder):
    import signal

    from mlx_dgemma.sharded import DENOISE

    def stop():
        os.kill(os.getpid(), signal.SIGSTOP)

    if os.environ.get("MLX_RANK") == rank == "1":
        stage = ShardedModel._stage

        def stuck_stage(self, cache, B, L, encode):
            if not encode:
                stop()
            return stage(self, cache, B, L, encode)

        ShardedModel._stage = stuck_stage
    elif os.environ.get("MLX_RANK") == rank == "0":
        announce = ShardedModel._announce

        def stuck_announce(self, op, *args, **kwargs):
            announce(self, op, *args, **kwargs)
            if op == DENOISE:  # rank 1 now waits in the pass for rank 0's hidden states
                stop()

        ShardedModel._announce = stuck_announce
    from mlx_dgemma.generate import main

    main(["--model", folder, "-p", "hello", "--seed", "0", "--pipeline", "--peer-timeout", "3", "--verbose", "false"])


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    {"parity": parity, "missing": missing, "die": die, "stuck": stuck}[command](*rest)
