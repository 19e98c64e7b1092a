"""Small random DiffusionGemma checkpoints written by the reference itself (transformers 5.24.0 + torch).

save_pretrained gives the exact file layout, key names, config.json and generation_config.json of a real
checkpoint, only smaller. Norm weights and router scales are perturbed and every layer_scalar is 0.9, so a port
that ignores any of them fails parity. Also used by the benchmarks (the `bench` preset has the released model's
proportions at a size this machine can time).
"""

from __future__ import annotations

import json
from pathlib import Path

ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}

PRESETS = {
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
        top_k_experts=2, layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        sliding_window=8, canvas_length=16, max_new_tokens=32, max_denoising_steps=8,
    ),
    "bench": dict(
        vocab_size=262_144, hidden_size=1024, intermediate_size=768, moe_intermediate_size=256, num_experts=32,
        top_k_experts=8, layer_types=["sliding_attention"] * 5 + ["full_attention"],
        num_attention_heads=8, num_key_value_heads=4, head_dim=128, global_head_dim=256, num_global_key_value_heads=1,
        sliding_window=1024, canvas_length=256, max_new_tokens=256, max_denoising_steps=48,
    ),
}


def layer_pattern(n: int) -> list[str]:
    """5 sliding : 1 full, the last layer full (the released model's pattern)."""
    return ["full_attention" if (i + 1) % 6 == 0 or i == n - 1 else "sliding_attention" for i in range(n)]


TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
    head_dim=16, patch_size=4, pooling_kernel_size=2, position_embedding_size=64,
)
# A tower that a port with any piece wrong fails on: two layers, the standardisation on (its buffers get random
# values below) and, below, a random position table (the reference initialises it to ones, which would hide an
# x/y swap or a missing lookup).
DISCRIMINATING_VISION = dict(num_hidden_layers=2, standardize=True)


def build_reference(out_dir, preset: str = "tiny", seed: int = 0, layers: int | None = None, dtype: str = "float32",
                    generation: dict | None = None, vision: dict | None = None, **overrides):
    """Write a reference checkpoint to `out_dir` and return the torch model (eval mode).

    `vision` overrides the tiny vision config (e.g. `DISCRIMINATING_VISION`); given, the tower's position table,
    `std_bias` and `std_scale` are also randomised (otherwise the tower is as the reference initialises it)."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig, Gemma4VisionConfig
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    p = {**PRESETS[preset], **overrides}
    if layers:
        p["layer_types"] = layer_pattern(layers)
    text = DiffusionGemmaTextConfig(
        vocab_size=p["vocab_size"], hidden_size=p["hidden_size"], intermediate_size=p["intermediate_size"],
        moe_intermediate_size=p["moe_intermediate_size"], num_experts=p["num_experts"], top_k_experts=p["top_k_experts"],
        num_hidden_layers=len(p["layer_types"]), layer_types=list(p["layer_types"]),
        num_attention_heads=p["num_attention_heads"], num_key_value_heads=p["num_key_value_heads"], head_dim=p["head_dim"],
        global_head_dim=p["global_head_dim"], num_global_key_value_heads=p["num_global_key_value_heads"],
        sliding_window=p["sliding_window"], max_position_embeddings=4096, final_logit_softcapping=30.0,
        hidden_activation="gelu_pytorch_tanh", use_bidirectional_attention="vision", rope_parameters=ROPE,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    vision_config = Gemma4VisionConfig(**{**TINY_VISION, **(vision or {})})
    v = p["vocab_size"]
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision_config, canvas_length=p["canvas_length"],
                                  boi_token_id=v - 12, eoi_token_id=v - 11, image_token_id=v - 10)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith(("router.scale", "router.per_expert_scale")):
                w.add_(0.1 * torch.randn_like(w))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(0.9)
        if vision is not None:
            tower = model.model.encoder.vision_tower
            tower.patch_embedder.position_embedding_table.normal_(0.0, 0.5)
            if vision_config.standardize:
                tower.std_bias.normal_(0.0, 10.0)
                tower.std_scale.uniform_(0.5, 1.5)
    gen = dict(
        max_new_tokens=p["max_new_tokens"], max_denoising_steps=p["max_denoising_steps"],
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1), t_min=0.4, t_max=0.8, stability_threshold=1,
        confidence_threshold=0.005, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    gen.update(generation or {})
    model.generation_config = DiffusionGemmaGenerationConfig(**gen)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out_dir)
    return model


def load_reference(folder):
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.set_flush_denormal(True)
    return DiffusionGemmaForBlockDiffusion.from_pretrained(folder).eval()


def rewrite_config_global_form(folder):
    """Replace `per_layer_config` by the `global_head_dim` + `num_global_key_value_heads` form."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    text = config["text_config"]
    overrides = list(text.pop("per_layer_config").values())
    text["global_head_dim"] = overrides[0]["head_dim"]
    text["num_global_key_value_heads"] = overrides[0]["num_key_value_heads"]
    path.write_text(json.dumps(config, indent=2))


SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>"]
WORDS = ["user", "model", "system", "thought", "hello", "world", "the", "sky", "is", "blue", "why", "hi", "a", "b", "c"]


IMAGE_TOKENS = {-12: "<|image>", -11: "<image|>", -10: "<|image|>"}  # at vocab_size + offset, as build_reference sets


def add_word_tokenizer(folder, vocab_size: int = 512, image_tokens: bool = False):
    """A whitespace word-level tokenizer with the Gemma 4 control tokens, so the built-in chat template applies;
    with `image_tokens`, also the image markers at the ids `build_reference` gives them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = SPECIAL + WORDS + [f"w{i}" for i in range(vocab_size - len(SPECIAL) - len(WORDS))]
    special = list(SPECIAL)
    if image_tokens:
        for offset, token in IMAGE_TOKENS.items():
            tokens[vocab_size + offset] = token
            special.append(token)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.save(str(Path(folder) / "tokenizer.json"))
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True}
    ))
