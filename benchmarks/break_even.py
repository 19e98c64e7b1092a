"""How many tokens a denoising step must commit to match (or double) autoregressive decoding: an ESTIMATE.

    python benchmarks/break_even.py                                  # the released model, 4-bit, M1 Ultra figures
    python benchmarks/break_even.py --bits 8 --ar-ms 16.4 --full-step-ms 222
    python benchmarks/break_even.py --config .cache/bench/bench-l6-s0/config.json --bits 32 --ar-ms 170 --full-step-ms 1640
    python benchmarks/break_even.py --from-json .cache/bench-generate.json   # calibrated on, and set beside, a run
                                                                              # of benchmarks/generate.py

Nothing here is measured by this script. It counts, for a decoder step over S canvas positions, the weight bytes
it must read and the multiply-adds it must do, against one autoregressive token, and turns them into times with
two effective rates calibrated on two measured points: the autoregressive token time (bandwidth-bound: every
active weight read once) and a full 256-position step's time (compute-bound). Defaults are the M1 Ultra 4-bit
figures in design notes (mlxcel: 14 ms per autoregressive token, ~640 ms per full-canvas step).

Why a mixture-of-experts model is hard for diffusion on a bandwidth-bound machine: one token reads top_k of the
E experts of each layer; S positions read the union of their experts, about E (1 - (1 - k/E)^S) under uniform
routing (real routers are skewed, which helps diffusion a little). At 16 positions that is 82 of 128 experts, ten
times a token's 8, so a 16-position step costs several tokens' time even though it computes little.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_check import RELEASED  # noqa: E402  (the released text config's shapes; stdlib imports only)


def shapes_from_config(path: str) -> dict:
    """The fields used here from a DiffusionGemma config.json (text_config, or the top level)."""
    raw = json.loads(Path(path).read_text())
    text = raw.get("text_config", raw)
    out = {k: text[k] for k in RELEASED if k in text}
    out["canvas_length"] = raw.get("canvas_length", text.get("canvas_length", 256))
    per_layer = text.get("per_layer_config") or {}
    full = list(per_layer.values())
    out.setdefault("global_head_dim", full[0].get("head_dim", text["head_dim"]) if full else text["head_dim"])
    out.setdefault("num_global_key_value_heads",
                   full[0].get("num_key_value_heads", text["num_key_value_heads"]) if full else text["num_key_value_heads"])
    out["full_layers"] = sum(t == "full_attention" for t in text.get("layer_types", [])) or None
    return out


def parameter_counts(s: dict) -> dict:
    """Parameters per part: attention + dense MLP + router per layer (averaged over the 5:1 sliding/full
    pattern), one expert, the embedding (tied head) and the decoder-only self-conditioning MLP."""
    h, n = s["hidden_size"], s["num_hidden_layers"]
    full = s.get("full_layers") or max(n // 6, 1)
    q, kv, d = s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]
    gd, gkv = s["global_head_dim"], s["num_global_key_value_heads"]
    sliding_attn = h * q * d + 2 * h * kv * d + q * d * h
    full_attn = h * q * gd + h * gkv * gd + q * gd * h  # keys are the values on full layers
    attn = ((n - full) * sliding_attn + full * full_attn) / n
    dense = attn + 3 * h * s["intermediate_size"] + h * s["num_experts"]
    return dict(dense_per_layer=dense, expert=3 * h * s["moe_intermediate_size"], embedding=s["vocab_size"] * h,
                self_conditioning=3 * h * s["intermediate_size"])


def distinct_experts(positions: int, experts: int, top_k: int) -> float:
    """Expected distinct experts of a layer read by `positions` tokens under uniform top-k routing."""
    return experts * (1 - (1 - top_k / experts) ** positions)


def bytes_per_parameter(bits: int, group_size: int = 64) -> float:
    """Affine quantization stores a 16-bit scale and bias per group; 16 and 32 bits are plain."""
    return bits / 8 + (4 / group_size if bits < 16 else 0.0)


def step_cost(s: dict, positions: int | None) -> tuple[float, float]:
    """(parameters read, multiply-add FLOPs) of one autoregressive token (`positions` None) or one decoder
    step over `positions` canvas positions. Attention over the cached keys is left out (short prompts)."""
    p = parameter_counts(s)
    n, e, k = s["num_hidden_layers"], s["num_experts"], s["top_k_experts"]
    active = n * (p["dense_per_layer"] + k * p["expert"]) + p["embedding"]
    if positions is None:
        return active, 2 * active
    read = n * (p["dense_per_layer"] + distinct_experts(positions, e, k) * p["expert"]) + p["embedding"]
    read += p["self_conditioning"]
    return read, 2 * positions * (active + p["self_conditioning"])


def table(s: dict, bits: int, ar_ms: float, full_step_ms: float,
          live=(256, 128, 64, 32, 16, 8, 4)) -> tuple[list[dict], float, float]:
    """Per position count: experts read, GB read, GFLOP and the estimated ms; and the two calibrated rates
    (bytes/s, FLOP/s)."""
    b = bytes_per_parameter(bits)
    ar_read, _ = step_cost(s, None)
    bandwidth = ar_read * b / (ar_ms / 1e3)  # effective bytes/s, from the token time
    canvas = s["canvas_length"]
    _, full_flops = step_cost(s, canvas)
    compute = full_flops / (full_step_ms / 1e3)  # effective FLOP/s, from the full step's time
    rows = []
    for n in live:
        read, flops = step_cost(s, n)
        ms = 1e3 * max(read * b / bandwidth, flops / compute)
        rows.append(dict(positions=n, experts=distinct_experts(n, s["num_experts"], s["top_k_experts"]),
                         gb=read * b / 1e9, gflop=flops / 1e9, ms=ms))
    return rows, bandwidth, compute


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a config.json (default: the released model's shapes)")
    p.add_argument("--bits", type=int, default=4, help="weight bits (4, 8; 16 or 32 unquantized)")
    p.add_argument("--ar-ms", type=float, default=14.0, help="measured time of one autoregressive token (ms)")
    p.add_argument("--full-step-ms", type=float, default=640.0, help="measured time of a full-canvas step (ms)")
    p.add_argument("--from-json", help="a benchmarks/generate.py result: its checkpoint's config, float32, its "
                                       "autoregressive token and fast first-step times, and its measured steps beside")
    a = p.parse_args(argv)
    measured = {}
    if a.from_json:
        run = json.loads(Path(a.from_json).read_text())
        fast = run["fast"]
        a.config, a.bits = str(Path(run["mlx_dgemma"]["checkpoint"]) / "config.json"), 32
        a.ar_ms = 1e3 / run["mlxlm_ar"]["decode_tok_s"]
        a.full_step_ms = fast["first_step_ms"]["median"]
        measured = {int(k): v["median"] for k, v in fast["step_ms_by_live"].items()}
    s = shapes_from_config(a.config) if a.config else dict(RELEASED)
    rows, bandwidth, compute = table(s, a.bits, a.ar_ms, a.full_step_ms)
    ar_read, _ = step_cost(s, None)
    print(f"ESTIMATE (the est. column and the tokens/step derived from it; nothing is timed here). "
          f"{a.config or 'released model'}, {a.bits}-bit weights; one autoregressive token reads "
          f"{ar_read * bytes_per_parameter(a.bits) / 1e9:.2f} GB. Effective rates calibrated on {a.ar_ms:.1f} ms/token "
          f"and {a.full_step_ms:.0f} ms per full step: {bandwidth / 1e9:.0f} GB/s, {compute / 1e12:.2f} TFLOP/s." +
          (" Tokens/step use the measured step where there is one." if measured else ""))
    extra = " measured ms/step (fast sampler) |" if measured else ""
    print("| positions computed | experts read per layer | GB read | GFLOP | est. ms/step |" + extra +
          " tokens/step to match AR | tokens/step for 2x AR |")
    print("|---:|---:|---:|---:|---:|" + ("---:|" if measured else "") + "---:|---:|")
    for r in rows:
        seen = f" {measured[r['positions']]:.0f} |" if r["positions"] in measured else (" |" if measured else "")
        even = measured.get(r["positions"], r["ms"]) / a.ar_ms
        print(f"| {r['positions']} | {r['experts']:.0f} of {s['num_experts']} | {r['gb']:.2f} | {r['gflop']:.0f} | "
              f"{r['ms']:.0f} |{seen} {even:.1f} | {2 * even:.1f} |")


if __name__ == "__main__":
    main()
