"""Image encoding: mlx_dgemma's vision tower beside mlx-vlm's and the reference's, at the released tower's shape.

    python benchmarks/vision.py [--budgets 280,1120] [--peers reference,mlxvlm] [--dtype float32]

The tower (27 layers, hidden 1152, 16 heads of 72, MLP 4304, patch 16, 3 x 3 pooling, standardisation on) and the
`embed_vision` projector (to the text width 2816) get random weights, built in each contender's own process; the
input is one image that fills the budget exactly (960 x 672 px: 2520 patches, 280 soft tokens; 1920 x 1344 px:
10 080 patches, 1120 soft tokens), so no resize is involved and no patch is padding. Timed: pixels (already
patchified) -> soft tokens in the text's space, evaluated. Each contender runs in a fresh process; reported are
the median of the timed runs after one warm-up, the process's peak RSS and, for MLX, MLX's allocator peak.

Peers: mlx-vlm's Gemma 4 `VisionModel` + `MultimodalEmbedder` (the separate venv `PEERS_PYTHON`, OpenBLAS
preloaded like us); transformers 5.24.0 `Gemma4VisionModel` + `DiffusionGemmaMultimodalEmbedder` on torch (CPU,
2 threads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

RELEASED_VISION = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
    head_dim=72, patch_size=16, pooling_kernel_size=3, position_embedding_size=10240, standardize=True,
    rms_norm_eps=1e-6,
)
TEXT_HIDDEN = 2816
IMAGE_SIDES = {280: (672, 960), 1120: (1344, 1920)}  # (height, width): exactly the budget, in 48-pixel blocks


def synthetic_patches(budget: int, seed: int = 0):
    """(pixels [P, 768] float32, positions [P, 2]) of a random image filling `budget` soft tokens exactly."""
    import numpy as np

    h, w = IMAGE_SIDES[budget]
    ph, pw = h // 16, w // 16
    rng = np.random.default_rng(seed)
    pixels = rng.random((ph * pw, 768), dtype=np.float32)
    gx, gy = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
    return pixels, np.stack([gx, gy], -1).reshape(-1, 2).astype(np.int64)


def _random_mlx_weights(module, dtype, seed=0):
    """Random normal weights (std 0.02; norms near one; std_scale near one) for an MLX module tree."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    mx.random.seed(seed)
    params = []
    for name, p in tree_flatten(module.parameters()):
        if name.endswith(("norm.weight", "std_scale")):
            v = 1.0 + 0.1 * mx.random.normal(p.shape)
        elif name.endswith("std_bias"):
            v = 10.0 * mx.random.normal(p.shape)
        else:
            v = 0.02 * mx.random.normal(p.shape)
        params.append((name, v.astype(dtype)))
    module.update(tree_unflatten(params))
    mx.eval(module.parameters())


def _time(run, budgets, repeats, warmup, seed, peak=None):
    """Wall and process-CPU milliseconds of `run(pixels, positions)` per budget (CPU time counts every thread
    and mostly ignores other processes' load)."""
    out = {}
    for budget in budgets:
        pixels, positions = synthetic_patches(budget, seed)
        cpu = {}
        samples = common.time_interleaved({"encode": lambda: run(pixels, positions)}, repeats=repeats, warmup=warmup,
                                          cpu_out=cpu)
        out[str(budget)] = {"encode_ms": common.summarize(samples["encode"]), "cpu_ms": common.summarize(cpu["encode"])}
        if peak is not None:
            out[str(budget)]["mlx_peak_mb"] = peak()
    return out


def _mlx_peak():
    import mlx.core as mx

    return round(mx.get_peak_memory() / 2**20, 1)


def ours_worker(budgets, repeats=2, warmup=1, layers=27, dtype="float32", seed=0, **_):
    import mlx.core as mx

    from mlx_dgemma import backend, cpu
    from mlx_dgemma.vision.tower import VisionArgs, VisionModel

    backend.current()
    cpu.keep_buffers()  # as load() does
    gemm = common.print_gemm_rate()
    model = VisionModel(VisionArgs(**{**RELEASED_VISION, "num_hidden_layers": layers}), TEXT_HIDDEN)
    _random_mlx_weights(model, getattr(mx, dtype), seed)

    def run(pixels, positions):
        out = model(pixels[None], positions[None])
        mx.eval(out)
        assert out.shape == (len(pixels) // 9, TEXT_HIDDEN)

    return {"gemm": gemm, "budgets": _time(run, budgets, repeats, warmup, seed, _mlx_peak)}


def mlxvlm_worker(budgets, repeats=2, warmup=1, layers=27, dtype="float32", seed=0, **_):
    import mlx.core as mx
    import mlx_vlm
    from mlx_vlm.models.gemma4.config import VisionConfig
    from mlx_vlm.models.gemma4.gemma4 import MultimodalEmbedder
    from mlx_vlm.models.gemma4.vision import VisionModel

    gemm = common.print_gemm_rate()
    shape = {**RELEASED_VISION, "num_hidden_layers": layers}
    config = VisionConfig(**{k: v for k, v in shape.items() if k in VisionConfig.__dataclass_fields__})
    tower = VisionModel(config)
    embedder = MultimodalEmbedder(config.hidden_size, TEXT_HIDDEN, eps=config.rms_norm_eps)
    _random_mlx_weights(tower, getattr(mx, dtype), seed)
    _random_mlx_weights(embedder, getattr(mx, dtype), seed + 1)

    def run(pixels, positions):
        out = embedder(tower(mx.array(pixels)[None], mx.array(positions)[None]))
        mx.eval(out)
        assert out.shape == (1, len(pixels) // 9, TEXT_HIDDEN)

    return {"gemm": gemm, "version": getattr(mlx_vlm, "__version__", "?"),
            "budgets": _time(run, budgets, repeats, warmup, seed, _mlx_peak)}


def reference_worker(budgets, repeats=2, warmup=1, layers=27, seed=0, threads=2, **_):
    import torch
    from transformers import DiffusionGemmaTextConfig, Gemma4VisionConfig
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaMultimodalEmbedder
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionModel

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    vision = Gemma4VisionConfig(**{**RELEASED_VISION, "num_hidden_layers": layers})
    text = DiffusionGemmaTextConfig(hidden_size=TEXT_HIDDEN, num_experts=4, top_k_experts=2, moe_intermediate_size=8)
    tower = Gemma4VisionModel(vision).eval()
    embedder = DiffusionGemmaMultimodalEmbedder(vision, text).eval()
    with torch.no_grad():
        tower.std_bias.normal_(0, 10)
        tower.std_scale.uniform_(0.5, 1.5)
    def run(pixels, positions):
        with torch.no_grad():
            px, pos = torch.from_numpy(pixels)[None], torch.from_numpy(positions)[None]
            embedder(tower(pixel_values=px, pixel_position_ids=pos).last_hidden_state)

    return {"torch": torch.__version__, "budgets": _time(run, budgets, repeats, warmup, seed)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", default="280,1120", help="Soft-token budgets (from 280, 1120).")
    ap.add_argument("--peers", default="reference,mlxvlm", help="Peers to run beside us (reference, mlxvlm).")
    ap.add_argument("--reference-budgets", default="280", help="Budgets for the reference (slow on a CPU).")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--layers", type=int, default=27, help="Encoder layers (27 in the release).")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default=str(common.REPO_ROOT / ".cache" / "bench" / "vision.json"))
    a = ap.parse_args(argv)
    budgets = [int(b) for b in a.budgets.split(",")]
    peers = [p for p in a.peers.split(",") if p]
    contenders = {"mlx_dgemma": ("benchmarks.vision:ours_worker", common.MAIN_PYTHON, True, budgets)}
    if "mlxvlm" in peers:
        contenders["mlx-vlm"] = ("benchmarks.vision:mlxvlm_worker", common.PEERS_PYTHON, True, budgets)
    if "reference" in peers:
        ref_budgets = [int(b) for b in a.reference_budgets.split(",")]
        contenders["reference"] = ("benchmarks.vision:reference_worker", common.MAIN_PYTHON, False, ref_budgets)
    results = {"machine": common.machine_info(), "loadavg_before": common.loadavg(), "dtype": a.dtype,
               "layers": a.layers}
    for budget in budgets:  # one fresh process per contender and budget, so peak RSS is that image's
        for name, (target, python, blas, allowed) in contenders.items():
            if budget not in allowed:
                continue
            kwargs = dict(budgets=[budget], repeats=a.repeats, warmup=a.warmup, layers=a.layers, dtype=a.dtype)
            try:
                r = common.run_in_subprocess(target, kwargs, python=python, preload_openblas=blas)
            except (common.ChildError, FileNotFoundError) as e:
                print(f"{name} did not run at {budget}: {e}", file=sys.stderr)
                continue
            row = r["budgets"][str(budget)]
            row.update(peak_rss_mb=r["peak_rss_mb"], **{k: r[k] for k in ("gemm", "version", "torch") if k in r})
            results.setdefault(name, {})[str(budget)] = row
    results["loadavg_after"] = common.loadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    for name in contenders:
        for row in results.get(name, {}).values():
            if "gemm" in row:
                print(f"{name}: {row['gemm']}")
                break
    for budget in budgets:
        rows = {name: {"encode_ms": r["encode_ms"]["median"], "cpu_ms": r["cpu_ms"]["median"],
                       "mlx_peak_mb": r.get("mlx_peak_mb"), "peak_rss_mb": r["peak_rss_mb"]}
                for name in contenders if (r := results.get(name, {}).get(str(budget)))}
        print(f"\n{budget} soft tokens ({IMAGE_SIDES[budget][0]} x {IMAGE_SIDES[budget][1]} px), {a.layers} layers, "
              f"{a.dtype}:")
        common.print_ratio_table(rows, ["encode_ms", "cpu_ms", "mlx_peak_mb", "peak_rss_mb"], baseline="mlx_dgemma")
    print(f"\nraw results: {a.out}")


if __name__ == "__main__":
    main()
