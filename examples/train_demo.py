"""Train the demo model that ships inside the package (`mlx_dgemma/demo/`), from scratch, on this machine's CPU.

    python examples/train_demo.py                       # data, blank model, training, then installs the result
    python examples/train_demo.py --work demo_work --no-install

Steps (each one a plain command you can also run by hand):
1. `examples/demo_tasks.py` writes train/valid/test JSONL (held-out test prompts never appear in training).
2. A blank model folder: a small DiffusionGemma `config.json` (the released architecture scaled down: hidden 128,
   3 sliding-window layers then a full-attention one, dense MLP plus 4 experts top-2 in every layer, a 20-token
   canvas), `generation_config.json` with the reference's sampler defaults, and the demo's character tokenizer and
   chat template.
3. `python -m mlx_dgemma.train --from-scratch --fine-tune-type full ...` with a fixed seed.
4. The trained folder is copied to `mlx_dgemma/demo/`.

Everything is seeded: the same command on the same software gives the same model. On the 2-core x86 machine the
bundled model was trained on (MLX's CPU build, OpenBLAS for the matrix products) the whole command took 24 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import demo_tasks  # noqa: E402

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
SEED = 0
CANVAS = 20
TRAINING = [  # the exact training command's options (besides paths)
    "--from-scratch", "--fine-tune-type", "full", "--seed", str(SEED),
    "--iters", "6000", "--batch-size", "32", "--learning-rate", "4e-3", "--warmup", "200",
    "--lr-schedule", "cosine", "--weight-decay", "0.01", "--grad-clip", "1.0",
    "--max-canvases", "1", "--steps-per-report", "100", "--steps-per-eval", "1000", "--val-batches", "6",
    "--save-every", "500",
]
SHIPPED = ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "chat_template.jinja"]


def model_config(vocab_size: int) -> dict:
    layer_types = ["sliding_attention"] * 3 + ["full_attention"]
    full = {str(i): {"head_dim": 64, "num_key_value_heads": 1} for i, t in enumerate(layer_types) if t == "full_attention"}
    text = {
        "model_type": "diffusion_gemma_text", "vocab_size": vocab_size, "hidden_size": 128, "intermediate_size": 128,
        "moe_intermediate_size": 64, "num_experts": 4, "top_k_experts": 2, "num_hidden_layers": len(layer_types),
        "layer_types": layer_types, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "per_layer_config": full, "sliding_window": 64, "max_position_embeddings": 1024,
        "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
        "use_bidirectional_attention": "vision", "attention_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1,
        "bos_token_id": 2,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
        },
    }
    # DiffusionGemma always has a vision tower; the demo is text-only, so the tower is the smallest there is.
    vision = {
        "model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "patch_size": 4, "pooling_kernel_size": 2,
        "position_embedding_size": 16, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "max_position_embeddings": 1024,
        "rope_parameters": {"rope_theta": 100.0, "rope_type": "axial"}, "standardize": False,
        "use_clipped_linears": False,
    }
    ids = {t: i for i, t in enumerate(demo_tasks.SPECIAL)}
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma", "dtype": "float32",
        "canvas_length": CANVAS, "boi_token_id": ids["<|image>"], "eoi_token_id": ids["<image|>"],
        "image_token_id": ids["<|image|>"], "initializer_range": 0.02, "tie_word_embeddings": True,
        "text_config": text, "vision_config": vision,
    }


def generation_config() -> dict:
    ids = {t: i for i, t in enumerate(demo_tasks.SPECIAL)}
    return {
        "bos_token_id": ids["<bos>"], "eos_token_id": [ids["<eos>"], ids["<turn|>"]], "pad_token_id": ids["<pad>"],
        "max_new_tokens": 2 * CANVAS, "max_denoising_steps": 48, "t_min": 0.4, "t_max": 0.8,
        "stability_threshold": 1, "confidence_threshold": 0.005, "return_dict_in_generate": True,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    }


def write_blank_model(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    vocab = demo_tasks.write_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(model_config(vocab), indent=2, sort_keys=True))
    (folder / "generation_config.json").write_text(json.dumps(generation_config(), indent=2, sort_keys=True))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="demo_work", help="Working folder (data, blank model, checkpoints).")
    p.add_argument("--no-install", action="store_true", help="Do not copy the result into mlx_dgemma/demo/.")
    p.add_argument("--resume", action="store_true", help="Continue an interrupted run from its last checkpoint.")
    p.add_argument("--iters", help="Override the number of steps (quick trials).")
    a = p.parse_args(argv)
    work = Path(a.work)
    data, blank, trained = work / "data", work / "blank", work / "model"
    if not (data / "train.jsonl").is_file():
        demo_tasks.write_data(data, SEED, demo_tasks.TRAIN_MIX, valid_per_task=50, test_per_task=500)
    write_blank_model(blank)
    options = list(TRAINING)
    if a.iters:
        options[options.index("--iters") + 1] = a.iters
    command = [sys.executable, "-m", "mlx_dgemma.train", "--model", str(blank), "--data", str(data),
               "--save-path", str(trained), *options, *(["--resume"] if a.resume else [])]
    run_and_install(command, trained, None if a.no_install else ROOT / "mlx_dgemma" / "demo")

def run_and_install(command: list[str], trained: Path, target: Path | None, env: dict | None = None):
    """Run the training command (this checkout first on the path, OpenBLAS when there is one), then copy the
    trained folder's shipped files into `target` (None: leave them)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    if sys.platform.startswith("linux") and "LD_PRELOAD" not in env and Path(OPENBLAS).is_file():
        # MLX's CPU wheel multiplies float32 matrices about 5 times slower than OpenBLAS on x86 (1.5 s against
        # 0.3 s per step here): use OpenBLAS when it is installed (apt install libopenblas0-pthread).
        env["LD_PRELOAD"] = OPENBLAS
        print(f"[INFO] using {OPENBLAS} for matrix products", flush=True)
    print("$", " ".join(command), flush=True)
    start = time.time()
    subprocess.run(command, check=True, env=env)
    print(f"[INFO] training took {(time.time() - start) / 60:.1f} min")
    if target is not None:
        target.mkdir(exist_ok=True)
        for name in SHIPPED:
            shutil.copy2(trained / name, target / name)
        print(f"[INFO] installed into {target}")

if __name__ == "__main__":
    main()
