"""The peers we compare mlx_dgemma against, each timed in its own fresh process.

    python benchmarks/peers.py {reference,mlxvlm,mlxlm_ar,all} [--checkpoint DIR] [--repeats N] [--warmup N]

prints one JSON line per peer. From Python:

    from benchmarks.peers import run_peer, reference, mlxvlm, mlxlm_ar
    r = reference(checkpoint)          # each runs in a child process and returns a dict (JSON-able)
    r["step_ms"]["median"], r["generate_ms"]["median"], r["peak_rss_mb"]

Peers:

* ``reference``: transformers 5.24.0 + torch 2.13.0 on CPU (2 threads, flush-denormal on), the project venv.
* ``mlxvlm``: mlx-vlm's DiffusionGemma port (the separate venv ``PEERS_PYTHON``, default /work/peers-venv),
  entropy-bound sampler, OpenBLAS preloaded.
* ``mlxlm_ar``: the autoregressive baseline, mlx-lm's ``gemma4_text`` with the same backbone sizes, random fp32
  weights, OpenBLAS preloaded.

What is measured (batch 1, a 64-token prompt, fp32):

* ``step_ms``: one denoising step of the decoder: self-conditioning (softmax(previous logits) @ E), all layers
  over the 256-token canvas against the encoded prompt, final norm, LM head and softcap. Sampler excluded.
* ``generate_ms``: a full generation, prompt encoding included: one canvas of 256 tokens, a fixed 16 denoising
  steps (adaptive stopping made inert with confidence_threshold=1e-30, so every step runs), the library's own
  generate loop and entropy-bound sampler.
* ``peak_rss_mb``: the child's peak resident set size (whole process, model load included), plus MLX's own
  allocator peak (``mlx_peak_mb``) where MLX is used.
* ``mlxlm_ar``: ``decode_tok_s`` for 256 generated tokens after the 64-token prompt (greedy), and ``total_ms``.

Each ``*_ms`` entry is ``common.summarize`` of the timed rounds: median, min, max, spread, samples. Step and
generation rounds are interleaved in one process after ``warmup`` untimed rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

try:  # imported as benchmarks.peers (repo root on sys.path) or run as a script (benchmarks/ on sys.path)
    from benchmarks import common
except ImportError:  # pragma: no cover
    import common  # type: ignore

PEER_NAMES = ("reference", "mlxvlm", "mlxlm_ar")

#: adaptive stopping threshold that never fires (mean entropy is never below it), so all steps run
NO_STOP = 1e-30


# ---------------------------------------------------------------------------------------------------------------
# Public API: each call runs one peer in a fresh child process
# ---------------------------------------------------------------------------------------------------------------


def run_peer(name: str, checkpoint=None, timeout: float = 1800, echo: bool = True, **kwargs) -> Dict[str, Any]:
    """Run peer ``name`` (``reference``, ``mlxvlm`` or ``mlxlm_ar``) in a fresh process; return its JSON dict.

    ``checkpoint`` is a bench checkpoint directory (built with ``common.build_bench_checkpoint`` if missing;
    ``None`` uses the default cache path). ``kwargs`` go to the worker (``prompt_len``, ``steps``, ``repeats``,
    ``warmup``, ``seed``, ...). The result carries ``peak_rss_mb`` and ``child_wall_s`` from the parent.
    """
    if name not in PEER_NAMES:
        raise ValueError(f"unknown peer {name!r}; choose from {PEER_NAMES}")
    ckpt = common.ensure_bench_checkpoint(checkpoint)
    if name == "reference":
        python, blas = common.MAIN_PYTHON, False
    elif name == "mlxvlm":
        python, blas = common.PEERS_PYTHON, True
        if not Path(python).exists():
            raise FileNotFoundError(
                f"mlx-vlm interpreter {python} not found: python3 -m venv /work/peers-venv && "
                "/work/peers-venv/bin/pip install 'mlx-vlm[cpu]' (or set MLX_DGEMMA_PEERS_PYTHON)"
            )
    else:
        python, blas = common.MAIN_PYTHON, True
    return common.run_in_subprocess(
        f"benchmarks.peers:{name}_worker",
        dict(checkpoint=str(ckpt), **kwargs),
        python=python,
        preload_openblas=blas,
        timeout=timeout,
        echo=echo,
    )


def reference(checkpoint=None, **kwargs) -> Dict[str, Any]:
    """transformers (torch CPU) reference, in a child process. See ``reference_worker`` for the kwargs."""
    return run_peer("reference", checkpoint, **kwargs)


def mlxvlm(checkpoint=None, **kwargs) -> Dict[str, Any]:
    """mlx-vlm's DiffusionGemma, in a child process (the peers venv). See ``mlxvlm_worker`` for the kwargs."""
    return run_peer("mlxvlm", checkpoint, **kwargs)


def mlxlm_ar(checkpoint=None, **kwargs) -> Dict[str, Any]:
    """mlx-lm gemma4_text autoregressive baseline, in a child process. See ``mlxlm_ar_worker``."""
    return run_peer("mlxlm_ar", checkpoint, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Workers: run inside the child process
# ---------------------------------------------------------------------------------------------------------------


def _timed_rounds(step, generate, repeats, step_repeats, warmup, warmup_generate):
    """``repeats`` interleaved rounds of (``step_repeats`` decoder steps, one generation), after warmup calls.

    ``warmup_generate`` short generations (2 denoising steps: same shapes and code paths, 1/8 of the cost) and
    ``warmup`` decoder steps run first, untimed.
    """
    cpu: Dict[str, list] = {}
    for _ in range(warmup_generate):
        generate(2)
    load = {"before": common.loadavg()}
    times = common.time_interleaved(
        {"step": step, "generate": generate},
        repeats=repeats,
        warmup={"step": warmup},
        per_round={"step": step_repeats, "generate": 1},
        cpu_out=cpu,
    )
    load["after"] = common.loadavg()
    return times, cpu, load


def _read_config(checkpoint) -> Dict[str, Any]:
    return json.loads((Path(checkpoint) / "config.json").read_text())


def reference_worker(
    checkpoint: str,
    prompt_len: int = 64,
    steps: int = 16,
    repeats: int = 2,
    step_repeats: int = 3,
    warmup: int = 1,
    warmup_generate: int = 1,
    seed: int = 0,
    threads: int = 2,
) -> Dict[str, Any]:
    """Time the transformers reference: a decoder step and ``model.generate`` (16 steps, 1 canvas)."""
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    import transformers
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.cache_utils import DynamicCache

    t0 = time.perf_counter()
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    cfg = model.config
    vocab, canvas_len = cfg.text_config.vocab_size, cfg.canvas_length
    prompt = torch.tensor([common.bench_prompt(prompt_len, vocab, seed)], dtype=torch.long)
    canvas = torch.tensor([common.bench_canvas(canvas_len, vocab, seed)], dtype=torch.long)

    with torch.inference_mode():
        # Encode the prompt once (and run a first decoder pass without self-conditioning for its logits).
        cache = DynamicCache(config=cfg.get_text_config(decoder=True))
        first = model(input_ids=prompt, cache=cache, decoder_input_ids=canvas)
        cache = first.cache
        sc_logits = first.logits
        # The decoder mask and positions, prepared once as generate() does.
        mask_mapping = model.model.decoder.create_diffusion_decoder_attention_mask(
            config=cfg,
            inputs_embeds=canvas.unsqueeze(-1),
            cache=cache,
            decoder_attention_mask=torch.ones((1, prompt_len + canvas_len), dtype=torch.bool),
        )
        positions = torch.arange(prompt_len, prompt_len + canvas_len, dtype=torch.int32).unsqueeze(0)
        seq_before = cache.get_seq_length()

        def step():
            out = model(
                decoder_input_ids=canvas,
                self_conditioning_logits=sc_logits,
                decoder_attention_mask=mask_mapping,
                cache=cache,
                decoder_position_ids=positions,
            )
            return out.logits

        gen_info: Dict[str, Any] = {}

        def generate(n_steps=steps):
            out = model.generate(
                prompt,
                max_new_tokens=canvas_len,
                max_denoising_steps=n_steps,
                confidence_threshold=NO_STOP,
            )
            gen_info["tokens_per_forward"] = float(out.tokens_per_forward.float().mean())
            gen_info["new_tokens"] = int(out.sequences.shape[1] - prompt_len)

        logits_shape = list(step().shape)
        assert cache.get_seq_length() == seq_before, "the decoder step must not grow the encoder cache"
        times, cpu, load = _timed_rounds(step, generate, repeats, step_repeats, warmup, warmup_generate)

    denoising_steps = gen_info["new_tokens"] / gen_info["tokens_per_forward"]
    return dict(
        peer="reference",
        library=f"transformers {transformers.__version__}, torch {torch.__version__}",
        device="cpu",
        torch_threads=torch.get_num_threads(),
        checkpoint=str(checkpoint),
        prompt_len=prompt_len,
        canvas_length=canvas_len,
        denoising_steps=steps,
        denoising_steps_run=round(denoising_steps, 2),
        generated_tokens=gen_info["new_tokens"],
        logits_shape=logits_shape,
        load_s=round(load_s, 2),
        step_ms=common.summarize(times["step"]),
        generate_ms=common.summarize(times["generate"]),
        step_cpu_ms=common.summarize(cpu["step"]),
        generate_cpu_ms=common.summarize(cpu["generate"]),
        loadavg=load,
        self_peak_rss_mb=common.self_peak_rss_mb(),
        machine=common.machine_info(),
    )


# -- mlx-vlm ------------------------------------------------------------------------------------------------------


def mlxvlm_checkpoint(checkpoint, out_dir=None) -> Path:
    """A copy of ``checkpoint`` that mlx-vlm can read: same weights (symlinked), a config variant, a tokenizer.

    * transformers 5.24 writes the full-attention layers' overrides as ``text_config.per_layer_config``
      ({layer: {head_dim, num_key_value_heads}}); mlx-vlm reads ``global_head_dim`` and
      ``num_global_key_value_heads`` instead, so those are written out.
    * The bench checkpoint has no tokenizer; mlx-vlm's loader and generate loop need one (detokenizer, EOS
      check), so a word-level tokenizer over the whole vocabulary (``t<id>``; 0/1/2 = pad/eos/bos) is added.

    Needs ``tokenizers`` and ``transformers`` (both in the mlx-vlm venv). Reused when already up to date.
    """
    src = Path(checkpoint).resolve()
    out = Path(out_dir) if out_dir else src.parent / (src.name + "-mlxvlm")
    config = json.loads((src / "config.json").read_text())
    weights = sorted(p.name for p in src.glob("*.safetensors"))
    stamp = {
        "source": str(src),
        "config_mtime": (src / "config.json").stat().st_mtime,
        "weights": {w: (src / w).stat().st_mtime for w in weights},
    }
    marker = out / "mlxvlm_variant.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == stamp:
                return out
        except ValueError:
            pass

    out.mkdir(parents=True, exist_ok=True)
    for w in weights + (["model.safetensors.index.json"] if (src / "model.safetensors.index.json").exists() else []):
        link = out / w
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(src / w)
    for extra in ("generation_config.json",):
        if (src / extra).exists():
            (out / extra).write_text((src / extra).read_text())

    text = config["text_config"]
    per_layer = text.pop("per_layer_config", None) or {}
    full = [i for i, t in enumerate(text.get("layer_types", [])) if t == "full_attention"]
    overrides = per_layer.get(str(full[0]), per_layer.get(full[0], {})) if full else {}
    if "head_dim" in overrides:
        text["global_head_dim"] = overrides["head_dim"]
    if "num_key_value_heads" in overrides:
        text["num_global_key_value_heads"] = overrides["num_key_value_heads"]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    if not (out / "tokenizer.json").exists():
        _write_id_tokenizer(out, int(text["vocab_size"]))
    marker.write_text(json.dumps(stamp, indent=1) + "\n")
    return out


def _write_id_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {0: "<pad>", 1: "<eos>", 2: "<bos>"}
    vocab = {specials.get(i, f"t{i}"): i for i in range(vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins word-level pieces with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<pad>"
    )
    fast.save_pretrained(str(out))


def mlxvlm_worker(
    checkpoint: str,
    prompt_len: int = 64,
    steps: int = 16,
    repeats: int = 2,
    step_repeats: int = 3,
    warmup: int = 1,
    warmup_generate: int = 1,
    seed: int = 0,
    temperature: float = 1.0,
    sampler: str = "entropy-bound",
) -> Dict[str, Any]:
    """Time mlx-vlm: a decoder step and ``model.generate`` (entropy-bound sampler, 16 steps, 1 canvas).

    ``temperature=1.0`` samples from the scheduled-temperature logits like the reference's multinomial
    (mlx-vlm's default 0.0 would take the argmax instead).
    """
    import mlx.core as mx
    import mlx_vlm
    from mlx_vlm import load

    variant = mlxvlm_checkpoint(checkpoint)
    mx.random.seed(seed)
    t0 = time.perf_counter()
    model, processor = load(str(variant))
    load_s = time.perf_counter() - t0
    # Adaptive stopping off: the mean-entropy test can never pass, so every step runs.
    model.config.generation_config = dict(model.config.generation_config or {}, confidence_threshold=NO_STOP)
    vocab = int(model.config.text_config.vocab_size)
    canvas_len = int(model.config.canvas_length)
    prompt = mx.array([common.bench_prompt(prompt_len, vocab, seed)], dtype=mx.int32)
    canvas = mx.array([common.bench_canvas(canvas_len, vocab, seed)], dtype=mx.int32)

    # Decoder step: encode the prompt once, one pass without self-conditioning for the logits, then time
    # self-conditioning + decoder + LM head + softcap.
    cache = model.make_cache()
    cache = model.diffusion_prefill_cache(
        prompt, attention_mask=None, cache=cache, pixel_values=None, mm_token_type_ids=None,
        prefill_step_size=None, chunk_prefill=False,
    )
    mx.eval([c.state for c in cache])
    offsets_before = [int(getattr(c, "offset", 0)) for c in cache]
    masks = model.diffusion_decoder_masks(canvas, cache, None)
    sc_ctx = model.diffusion_prepare_self_conditioning()
    logits0 = model.diffusion_decoder_logits(canvas, cache=cache, self_conditioning=None, decoder_attention_mask=masks)
    mx.eval(logits0)

    def step():
        sc = model.diffusion_self_conditioning(logits0, sc_ctx)
        out = model.diffusion_decoder_logits(canvas, cache=cache, self_conditioning=sc, decoder_attention_mask=masks)
        mx.eval(out)
        return out

    logits_shape = list(step().shape)
    assert [int(getattr(c, "offset", 0)) for c in cache] == offsets_before, "decoder step grew the cache"

    tokenizer = getattr(processor, "tokenizer", processor)
    stats: Dict[str, Any] = {}
    gen_info: Dict[str, Any] = {}

    def generate(n_steps=steps):
        out = model.generate(
            prompt,
            temperature=temperature,
            steps=n_steps,
            gen_length=canvas_len,
            processor=processor,
            tokenizer=tokenizer,
            diffusion_sampler=sampler,
            diffusion_full_canvas=True,
            stats=stats,
        )
        mx.eval(out)
        gen_info["new_tokens"] = int(out.shape[1])
        gen_info["denoising_steps_run"] = stats.get("diffusion_denoising_steps")

    mx.reset_peak_memory()
    times, cpu, load = _timed_rounds(step, generate, repeats, step_repeats, warmup, warmup_generate)
    return dict(
        peer="mlxvlm",
        library=f"mlx-vlm {mlx_vlm.__version__}, mlx {mx.__version__}",
        device=str(mx.default_device()),
        ld_preload=os.environ.get("LD_PRELOAD", ""),
        checkpoint=str(checkpoint),
        variant=str(variant),
        prompt_len=prompt_len,
        canvas_length=canvas_len,
        denoising_steps=steps,
        denoising_steps_run=gen_info.get("denoising_steps_run"),
        generated_tokens=gen_info.get("new_tokens"),
        sampler=sampler,
        temperature=temperature,
        logits_shape=logits_shape,
        load_s=round(load_s, 2),
        step_ms=common.summarize(times["step"]),
        generate_ms=common.summarize(times["generate"]),
        step_cpu_ms=common.summarize(cpu["step"]),
        generate_cpu_ms=common.summarize(cpu["generate"]),
        loadavg=load,
        mlx_peak_mb=round(mx.get_peak_memory() / 2**20, 1),
        self_peak_rss_mb=common.self_peak_rss_mb(),
        machine=common.machine_info(),
    )


# -- mlx-lm autoregressive baseline -------------------------------------------------------------------------------


def gemma4_text_args(checkpoint=None) -> Dict[str, Any]:
    """mlx-lm ``gemma4_text`` ModelArgs with the bench backbone (read from ``checkpoint`` when given).

    Same sizes as the diffusion backbone: dense MLP + MoE in every layer, full layers with keys = values,
    ``global_head_dim`` heads and ``num_global_key_value_heads``; no per-layer inputs, no KV sharing.
    """
    p = dict(common.BENCH_PRESET)
    layer_types = common.bench_layer_types(6)
    if checkpoint:
        t = _read_config(checkpoint)["text_config"]
        layer_types = list(t["layer_types"])
        for k in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_experts",
                  "top_k_experts", "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window"):
            p[k] = t[k]
        full = [i for i, lt in enumerate(layer_types) if lt == "full_attention"]
        over = (t.get("per_layer_config") or {}).get(str(full[0]), {}) if full else {}
        p["global_head_dim"] = over.get("head_dim", t.get("global_head_dim", p["global_head_dim"]))
        p["num_global_key_value_heads"] = over.get(
            "num_key_value_heads", t.get("num_global_key_value_heads", p["num_global_key_value_heads"])
        )
    return dict(
        model_type="gemma4_text",
        vocab_size=p["vocab_size"],
        vocab_size_per_layer_input=p["vocab_size"],
        hidden_size=p["hidden_size"],
        num_hidden_layers=len(layer_types),
        layer_types=layer_types,
        intermediate_size=p["intermediate_size"],
        moe_intermediate_size=p["moe_intermediate_size"],
        enable_moe_block=True,
        num_experts=p["num_experts"],
        top_k_experts=p["top_k_experts"],
        num_attention_heads=p["num_attention_heads"],
        num_key_value_heads=p["num_key_value_heads"],
        head_dim=p["head_dim"],
        global_head_dim=p["global_head_dim"],
        num_global_key_value_heads=p["num_global_key_value_heads"],
        attention_k_eq_v=True,
        num_kv_shared_layers=0,
        hidden_size_per_layer_input=0,
        use_double_wide_mlp=False,
        sliding_window=p["sliding_window"],
        max_position_embeddings=4096,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        },
    )


def mlxlm_ar_worker(
    checkpoint: Optional[str] = None,
    prompt_len: int = 64,
    gen_tokens: int = 256,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    **_ignored,
) -> Dict[str, Any]:
    """Time mlx-lm ``gemma4_text`` (random fp32 weights): 256 greedy tokens after a 64-token prompt.

    Uses ``mlx_lm.generate.generate_step`` (the loop under ``stream_generate``) with a fresh KV cache per round.
    ``prefill_ms`` is the time to the first token; ``decode_tok_s`` the tokens after it per second.
    """
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step
    from mlx_lm.models import gemma4_text
    from mlx.utils import tree_flatten

    mx.random.seed(seed)
    args = gemma4_text.ModelArgs.from_dict(gemma4_text_args(checkpoint))
    model = gemma4_text.Model(args)
    model.eval()
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    prompt = mx.array(common.bench_prompt(prompt_len, args.vocab_size, seed), dtype=mx.int32)

    def run(max_tokens):
        cache = model.make_cache()
        c0, t0 = time.process_time(), time.perf_counter()
        t_first = None
        n = 0
        for _token, _ in generate_step(prompt, model, max_tokens=max_tokens, prompt_cache=cache):
            n += 1
            if t_first is None:
                t_first = time.perf_counter()
        t_end = time.perf_counter()
        return dict(prefill_ms=(t_first - t0) * 1e3, decode_ms=(t_end - t_first) * 1e3,
                    total_ms=(t_end - t0) * 1e3, cpu_ms=(time.process_time() - c0) * 1e3, tokens=n)

    for _ in range(warmup):  # compiles/touches everything; a short generation is enough
        run(min(gen_tokens, 16))
    mx.reset_peak_memory()
    load = {"before": common.loadavg()}
    rounds = [run(gen_tokens) for _ in range(repeats)]
    load["after"] = common.loadavg()
    decode_tok_s = [(x["tokens"] - 1) / (x["decode_ms"] / 1e3) for x in rounds]
    total_tok_s = [x["tokens"] / (x["total_ms"] / 1e3) for x in rounds]
    dec = common.summarize(decode_tok_s)
    return dict(
        peer="mlxlm_ar",
        library=f"mlx-lm {mlx_lm.__version__}, mlx {mx.__version__}",
        device=str(mx.default_device()),
        ld_preload=os.environ.get("LD_PRELOAD", ""),
        model="gemma4_text (random fp32 weights, bench backbone)",
        parameters_m=round(n_params / 1e6, 1),
        prompt_len=prompt_len,
        generated_tokens=rounds[0]["tokens"],
        decode_tok_s=dec["median"],
        decode_tok_s_stats=dec,
        overall_tok_s=common.summarize(total_tok_s)["median"],
        ms_per_token=round(1e3 / dec["median"], 2),
        prefill_ms=common.summarize([x["prefill_ms"] for x in rounds]),
        decode_ms=common.summarize([x["decode_ms"] for x in rounds]),
        total_ms=common.summarize([x["total_ms"] for x in rounds]),
        total_cpu_ms=common.summarize([x["cpu_ms"] for x in rounds]),
        loadavg=load,
        mlx_peak_mb=round(mx.get_peak_memory() / 2**20, 1),
        self_peak_rss_mb=common.self_peak_rss_mb(),
        machine=common.machine_info(),
    )


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("peer", choices=PEER_NAMES + ("all",))
    ap.add_argument("--checkpoint", help="bench checkpoint dir (built if missing; default: the .cache path)")
    ap.add_argument("--repeats", type=int,
                    help="timed generations (default: 2 for the diffusion peers, 3 for mlxlm_ar)")
    ap.add_argument("--step-repeats", type=int, help="timed decoder steps per round (default 3)")
    ap.add_argument("--warmup", type=int, help="untimed decoder steps / AR warmup generations first (default 1)")
    ap.add_argument("--steps", type=int, default=16, help="denoising steps per canvas (default 16)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="print the whole result (default drops machine info)")
    a = ap.parse_args(argv)

    names = PEER_NAMES if a.peer == "all" else (a.peer,)
    for name in names:
        kw: Dict[str, Any] = dict(prompt_len=a.prompt_len, seed=a.seed)
        if name != "mlxlm_ar":
            kw["steps"] = a.steps
            if a.step_repeats is not None:
                kw["step_repeats"] = a.step_repeats
        if a.repeats is not None:
            kw["repeats"] = a.repeats
        if a.warmup is not None:
            kw["warmup"] = a.warmup
        try:
            res = run_peer(name, a.checkpoint, **kw)
        except common.ChildError as exc:
            res = dict(exc.result, peer=name, error=str(exc))
        if not a.full:
            res.pop("machine", None)
            res.pop("log_tail", None)
            res.pop("traceback", None)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
