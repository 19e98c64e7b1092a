"""The released model's shapes on a GPU, with random weights built directly in our converted 4-bit layout.

    python benchmarks/gpu_check.py            # full size (30 layers, hidden 2816, 128 experts, vocab 262,144)
    python benchmarks/gpu_check.py --tiny     # the same code at a size any CPU runs in seconds (a dry run)

No download and no conversion: the converter's own plan (`conversion_plan.make_plan` with the default mixed
4-bit recipe: routed experts 4-bit, everything else 8-bit, group 64) says which tensor is quantized how;
`quantize.apply_to_model` lays the model out as `load()` would for a converted folder; then every parameter gets
random values in that layout (packed 4/8-bit codes, scales and biases that give weights of spread
1/sqrt(fan_in), ones for norms). Timed, one after another, in this process:

* a decoder step: `model.denoise` of a 256-token canvas over a 64-token prompt, self-conditioning on;
* the loop's step and a 256-token generation: `generate_tokens` at exactly 16 denoising steps, one canvas;
* mlx-lm's autoregressive `gemma4_text` on the same backbone, quantized the same way: 256 greedy tokens.

Each is printed against its floors: FLOPs over the peak matrix rate, and bytes that must be read over the peak
memory bandwidth (`--peak-tflops`, `--peak-gbs`: datasheet-style numbers, H200 by default; the measured GEMM
rates are printed too). The floors are estimates of what no implementation can beat, not measurements.
Prints one JSON line at the end (also written to --json).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEPS = 16
PROMPT = 64

# The released google/diffusiongemma-26B-A4B-it text config (design/spec.md section 1.1).
RELEASED = dict(
    vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16,
    num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2, sliding_window=1024,
    num_experts=128, top_k_experts=8, moe_intermediate_size=704, canvas_length=256,
)
TINY = dict(
    vocab_size=2048, hidden_size=128, intermediate_size=192, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, global_head_dim=64, num_global_key_value_heads=1, sliding_window=64,
    num_experts=16, top_k_experts=4, moe_intermediate_size=64, canvas_length=32,
)


def config_json(shapes: dict) -> dict:
    """A diffusion_gemma config.json (text only) with these shapes, in the reference's global_head_dim form."""
    n = shapes["num_hidden_layers"]
    text = {k: v for k, v in shapes.items() if k != "canvas_length"}
    text.update(
        model_type="diffusion_gemma_text", hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
        final_logit_softcapping=30.0, use_bidirectional_attention="vision", attention_k_eq_v=True,
        layer_types=["full_attention" if (i + 1) % 6 == 0 or i == n - 1 else "sliding_attention" for i in range(n)],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        },
        pad_token_id=0, eos_token_id=1, bos_token_id=2, max_position_embeddings=4096,
    )
    return {"model_type": "diffusion_gemma", "text_config": text, "canvas_length": shapes["canvas_length"],
            "dtype": "bfloat16"}


def randomize(model, seed: int = 0):
    """Random values for every parameter, in the layout it has: packed codes for quantized weights, scales and
    biases giving a weight spread of 1/sqrt(fan_in) (codes centred on zero), N(0, 1/fan_in) for float matrices,
    ones for vectors (norms, scalars). Evaluated a tensor at a time: peak memory stays near the weights."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    modules = dict(model.named_modules())
    key = mx.random.key(seed)
    params = dict(tree_flatten(model.parameters()))
    new = {}
    for name, value in params.items():
        key, k = mx.random.split(key)
        path, _, leaf = name.rpartition(".")
        module = modules.get(path)
        bits = getattr(module, "bits", None)
        if value.dtype == mx.uint32:
            k1, k2 = mx.random.split(k)
            half = lambda kk: mx.random.randint(0, 1 << 16, value.shape, key=kk).astype(mx.uint32)  # noqa: E731
            out = (half(k1) << 16) | half(k2)  # uniformly random packed codes
        elif leaf == "scales" and bits:
            fan_in = value.shape[-1] * module.group_size
            code_std = 2**bits / math.sqrt(12)  # uniform codes in [0, 2^bits)
            out = (mx.random.uniform(0.75, 1.25, value.shape, key=k) / (code_std * math.sqrt(fan_in))).astype(value.dtype)
        elif leaf == "biases" and bits:
            continue  # from the scales, below
        elif value.ndim >= 2:
            out = (mx.random.normal(value.shape, key=k) * value.shape[-1] ** -0.5).astype(value.dtype)
        else:
            out = mx.ones(value.shape, dtype=value.dtype)
        mx.eval(out)
        new[name] = out
    for name, value in params.items():
        path, _, leaf = name.rpartition(".")
        module = modules.get(path)
        if leaf == "biases" and getattr(module, "bits", None):
            new[name] = (-(2 ** module.bits - 1) / 2 * new[f"{path}.scales"]).astype(value.dtype)
            mx.eval(new[name])
    model.update(tree_unflatten(list(new.items())))


def nbytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def build_ours(shapes: dict, seed: int = 0, dtype=None):
    """Our model in the converted 4-bit layout (mixed recipe), random weights; returns (model, plan)."""
    import mlx.core as mx

    dtype = dtype or mx.bfloat16

    from mlx_dgemma.config import ModelArgs, SamplerConfig
    from mlx_dgemma.conversion_plan import make_plan
    from mlx_dgemma.model import Model
    from mlx_dgemma.quantize import apply_to_model

    config = config_json(shapes)
    args = ModelArgs.from_dict(config)
    plan = make_plan(args, config, None, dtype=dtype, quantize=True, bits=4, group_size=64, mode="affine",
                     recipe="mixed", dequantize=False)
    names = {t.name: None for e in plan.entries for t in e.outputs()}
    model = Model(args)
    model.set_dtype(dtype)
    apply_to_model(model, plan.quantization, names)
    randomize(model, seed)
    model.sampler_defaults = SamplerConfig(eos_token_ids=[], pad_token_id=0)
    model.vision = None
    model.eval()
    return model, plan


def build_mlxlm(shapes: dict, seed: int = 0, dtype=None):
    """mlx-lm's gemma4_text with the same backbone, quantized like ours (experts 4-bit, the rest 8-bit)."""
    import mlx.core as mx

    dtype = dtype or mx.bfloat16
    import mlx.nn as nn
    from mlx_lm.models import gemma4_text

    n = shapes["num_hidden_layers"]
    text = config_json(shapes)["text_config"]
    args = gemma4_text.ModelArgs.from_dict(dict(
        text, model_type="gemma4_text", vocab_size_per_layer_input=shapes["vocab_size"], enable_moe_block=True,
        num_kv_shared_layers=0, hidden_size_per_layer_input=0, use_double_wide_mlp=False, tie_word_embeddings=True,
        num_hidden_layers=n,
    ))
    model = gemma4_text.Model(args)
    model.set_dtype(dtype)

    def predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        return {"group_size": 64, "bits": 4 if "switch" in path or "experts" in path else 8}

    nn.quantize(model, group_size=64, bits=8, class_predicate=predicate)
    randomize(model, seed)
    model.eval()
    return model


# --- floors ------------------------------------------------------------------------------------------------------


def matmul_params(shapes: dict) -> dict:
    """Weights per token of each kind (multiply-adds per token = these), for the floors."""
    h, n = shapes["hidden_size"], shapes["num_hidden_layers"]
    layer_types = config_json(shapes)["text_config"]["layer_types"]
    attention = 0
    for t in layer_types:
        if t == "full_attention":
            d, kv = shapes["global_head_dim"], shapes["num_global_key_value_heads"]
            attention += h * shapes["num_attention_heads"] * d * 2 + h * kv * d  # q, o; k (= v)
        else:
            d, kv = shapes["head_dim"], shapes["num_key_value_heads"]
            attention += h * shapes["num_attention_heads"] * d * 2 + 2 * h * kv * d
    dense = n * 3 * h * shapes["intermediate_size"]
    expert = 3 * h * shapes["moe_intermediate_size"]
    return dict(attention=attention, dense=dense, router=n * h * shapes["num_experts"],
                active_experts=n * shapes["top_k_experts"] * expert, all_experts=n * shapes["num_experts"] * expert,
                vocab=shapes["vocab_size"] * h, self_conditioning=3 * h * shapes["intermediate_size"])


def floors(shapes: dict, weight_bytes: int, peak_tflops: float, peak_gbs: float) -> dict:
    """ms floors: (FLOPs / peak rate, bytes read / peak bandwidth) for a decoder step and an autoregressive token."""
    p = matmul_params(shapes)
    c = shapes["canvas_length"]
    backbone = p["attention"] + p["dense"] + p["router"] + p["active_experts"]
    step_flops = 2 * c * (backbone + p["self_conditioning"] + 2 * p["vocab"])  # LM head + soft embedding
    ar_flops = 2 * (backbone + p["vocab"])
    # A canvas of 256 x top-8 rows reaches every one of 128 experts (each is missed with probability
    # (1 - 8/128)^256 < 1e-7): a step reads all the weights. One autoregressive token reads its top-8.
    fraction_experts = p["active_experts"] / p["all_experts"]
    total = sum(v for k, v in p.items() if k not in ("active_experts",))
    expert_share = p["all_experts"] / total
    ar_bytes = weight_bytes * (1 - expert_share + expert_share * fraction_experts)
    ms = lambda flops, b: (1e3 * flops / (peak_tflops * 1e12), 1e3 * b / (peak_gbs * 1e9))  # noqa: E731
    step_compute, step_memory = ms(step_flops, weight_bytes)
    ar_compute, ar_memory = ms(ar_flops, ar_bytes)
    return dict(step_tflop=step_flops / 1e12, step_compute_ms=step_compute, step_memory_ms=step_memory,
                ar_gflop=ar_flops / 1e9, ar_compute_ms=ar_compute, ar_memory_ms=ar_memory,
                weight_gb=weight_bytes / 1e9)


# --- timing ------------------------------------------------------------------------------------------------------


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def time_ours(model, shapes: dict, repeats: int) -> dict:
    import mlx.core as mx

    from benchmarks.common import bench_canvas, bench_prompt
    from mlx_dgemma.diffusion import DiffusionStats, generate_tokens

    v, c = shapes["vocab_size"], shapes["canvas_length"]
    prompt = bench_prompt(PROMPT, v)
    canvas = mx.array([bench_canvas(c, v)])
    cache = model.make_cache()
    model.encode(mx.array([prompt]), cache)
    logits = model.denoise(canvas, cache)
    mx.eval(cache.state(), logits)
    step = median_ms(lambda: mx.eval(model.denoise(canvas, cache, self_conditioning_logits=logits)), repeats)
    info = {}

    def generate():
        stats = DiffusionStats()
        out = generate_tokens(model, [prompt], max_tokens=c, seed=0, max_denoising_steps=STEPS,
                              confidence_threshold=1e-30, eos_token_ids=[], stats=stats)
        info.update(tokens=len(out[0]), steps=stats.steps)

    gen = median_ms(generate, max(1, repeats // 2))
    return dict(step_ms=step, generate_ms=gen, loop_step_ms=gen / max(info["steps"], 1), tokens=info["tokens"],
                steps=info["steps"], tok_s=info["tokens"] / (gen / 1e3))


def time_mlxlm(model, shapes: dict, repeats: int) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from benchmarks.common import bench_prompt

    prompt = mx.array(bench_prompt(PROMPT, shapes["vocab_size"]), dtype=mx.int32)
    n = shapes["canvas_length"]

    def run():
        t0, first, count = time.perf_counter(), None, 0
        for _ in generate_step(prompt, model, max_tokens=n, prompt_cache=model.make_cache()):
            count += 1
            first = first or time.perf_counter()
        return count, (time.perf_counter() - first) * 1e3, (first - t0) * 1e3

    run()
    rounds = [run() for _ in range(max(1, repeats // 2))]
    decode = statistics.median(r[1] / max(r[0] - 1, 1) for r in rounds)
    return dict(ms_per_token=decode, tok_s=1e3 / decode, tokens=rounds[0][0],
                prefill_ms=statistics.median(r[2] for r in rounds))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shapes: a dry run of every piece, on any device")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak bf16 matrix rate (H200 SXM datasheet)")
    p.add_argument("--peak-gbs", type=float, default=4800.0, help="peak memory bandwidth in GB/s (H200: 4.8 TB/s)")
    p.add_argument("--skip-mlxlm", action="store_true")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)

    import mlx.core as mx

    from benchmarks import blas

    shapes = TINY if a.tiny else RELEASED
    result = {"device": str(mx.default_device()), "mlx": mx.__version__, "shapes": "tiny" if a.tiny else "released"}
    result["gemm_fp32_gflops"] = round(blas.gemm_rate(4096 if not a.tiny else 256), 1)
    print(f"{result['device']}, mlx {mx.__version__}; float32 GEMM {result['gemm_fp32_gflops']} GFLOP/s", flush=True)

    # bfloat16 as released; a CPU dry run in float32 (MLX's CPU quantized matmul is slow in bfloat16)
    dtype = mx.float32 if a.tiny and mx.default_device() == mx.cpu else mx.bfloat16
    result["dtype"] = str(dtype)
    t = time.perf_counter()
    model, plan = build_ours(shapes, dtype=dtype)
    weight_bytes = nbytes(model)
    result["build_s"] = round(time.perf_counter() - t, 1)
    f = floors(shapes, weight_bytes, a.peak_tflops, a.peak_gbs)
    result["floors"] = {k: round(v, 4) for k, v in f.items()}
    print(f"ours: {weight_bytes / 1e9:.2f} GB of weights ({8 * weight_bytes / sum(e.parameters for e in plan.entries):.2f}"
          f" bits/weight), built in {result['build_s']} s", flush=True)
    ours = time_ours(model, shapes, a.repeats)
    result["ours"] = {k: round(v, 2) for k, v in ours.items()}
    floor_step = max(f["step_compute_ms"], f["step_memory_ms"])
    print(f"decoder step (denoise):   {ours['step_ms']:9.2f} ms   floors: {f['step_compute_ms']:.2f} ms compute "
          f"({f['step_tflop']:.2f} TFLOP), {f['step_memory_ms']:.2f} ms memory -> {ours['step_ms'] / floor_step:.1f}x the floor")
    print(f"loop step (in generation): {ours['loop_step_ms']:8.2f} ms   ({ours['steps']} steps)")
    print(f"{ours['tokens']}-token generation:     {ours['generate_ms']:9.1f} ms   {ours['tok_s']:.1f} tok/s at {STEPS} steps/canvas; "
          f"floor {STEPS * floor_step:.1f} ms", flush=True)
    del model
    gc.collect()
    mx.clear_cache()

    if not a.skip_mlxlm:
        ar_model = build_mlxlm(shapes, dtype=dtype)
        ar = time_mlxlm(ar_model, shapes, a.repeats)
        result["mlxlm_ar"] = {k: round(v, 2) for k, v in ar.items()}
        floor_ar = max(f["ar_compute_ms"], f["ar_memory_ms"])
        print(f"mlx-lm gemma4_text (AR):  {ar['ms_per_token']:9.2f} ms/token  {ar['tok_s']:.1f} tok/s   floors: "
              f"{f['ar_compute_ms']:.3f} ms compute, {f['ar_memory_ms']:.3f} ms memory -> {ar['ms_per_token'] / floor_ar:.1f}x")
        print(f"diffusion / autoregressive tokens per second: {ours['tok_s'] / ar['tok_s']:.2f}x "
              f"(at {STEPS} steps per {shapes['canvas_length']}-token canvas, adaptive stopping off)")
        del ar_model
    line = json.dumps(result)
    print(line)
    if a.json:
        Path(a.json).write_text(line + "\n")


if __name__ == "__main__":
    main()
