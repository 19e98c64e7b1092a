"""Model and sampler configuration read from a checkpoint folder.

`ModelArgs` is the text stack as the reference builds it from `config.json` (nested `text_config`), with every
default the reference applies in `DiffusionGemmaTextConfig.__post_init__` resolved here once, so the model code
never has to guess. `SamplerConfig` holds the block-diffusion defaults from `generation_config.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

# Float dtypes a folder's weights may be converted to (weights.DTYPE_NAMES maps them to MLX's), and the quantization
# recipes (quantize.py); here, without MLX, so that the command lines' --help answers at once.
DTYPES = ("float32", "float16", "bfloat16")
QUANT_RECIPES = ("mixed", "uniform")

# Prompt tokens per encoder chunk: peak memory grows with the chunk rather than the prompt.
DEFAULT_PREFILL_STEP = 2048

# The sampler settings a caller (API keyword, command-line flag) may override, as SamplerConfig names them.
SAMPLER_FLAGS = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold", "confidence_threshold",
                 "sampler", "fast_sampler", "eos_token_ids")

SLIDING = "sliding_attention"
FULL = "full_attention"

MODEL_TYPES = ("diffusion_gemma",)
TEXT_MODEL_TYPES = ("diffusion_gemma_text",)

DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


# The soft-token budgets per image that the Gemma 4 image processor accepts (`max_soft_tokens`).
IMAGE_SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)


class ConfigError(ValueError):
    """A checkpoint's configuration cannot be used; the message names the file and the key."""


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


@dataclass
class ModelArgs:
    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    layer_types: list[str] = field(default_factory=list)
    # Per-layer attention geometry after the full-attention overrides are applied.
    layer_head_dims: list[int] = field(default_factory=list)
    layer_kv_heads: list[int] = field(default_factory=list)
    rope_parameters: dict = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_ROPE)))
    sliding_window: int = 512
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    num_experts: int = 128
    top_k_experts: int = 8
    moe_intermediate_size: int = 704
    canvas_length: int = 256
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    tie_word_embeddings: bool = True
    model_type: str = "diffusion_gemma"

    def __post_init__(self):
        n = self.num_hidden_layers
        if not self.layer_types:
            self.layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(n)]
        if len(self.layer_types) != n:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {n} layers")
        if self.layer_types[-1] != FULL:  # the reference forces the last layer to full attention
            self.layer_types = [*self.layer_types[:-1], FULL]
        unknown = set(self.layer_types) - {SLIDING, FULL}
        if unknown:
            raise ConfigError(f"layer_types: unknown layer type(s) {sorted(unknown)}")
        if not self.layer_head_dims:
            self.layer_head_dims = [self.head_dim] * n
        if not self.layer_kv_heads:
            self.layer_kv_heads = [self.num_key_value_heads] * n
        for i, kv in enumerate(self.layer_kv_heads):
            if self.num_attention_heads % kv:
                raise ConfigError(
                    f"layer {i}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                    f"num_key_value_heads={kv}"
                )

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        """Resolve a Hugging Face `config.json` (outer `diffusion_gemma` or bare text config) the way the reference does."""
        model_type = config.get("model_type")
        if model_type in MODEL_TYPES:
            text = dict(config.get("text_config") or {})
            outer = config
        elif model_type in TEXT_MODEL_TYPES:
            text, outer = dict(config), {}
        else:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported (expected one of {list(MODEL_TYPES)})"
            )
        if text.get("use_bidirectional_attention") == "all":
            raise ConfigError(
                f"{source}: text_config.use_bidirectional_attention='all' (a bidirectional encoder) is not supported; "
                "the released checkpoint uses 'vision'"
            )
        act = text.get("hidden_activation", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"{source}: text_config.hidden_activation {act!r} is not supported")
        for key in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            if text.get(key) is None:
                raise ConfigError(f"{source}: text_config.{key} is missing (DiffusionGemma layers are always MoE)")

        names = {f.name for f in fields(cls)} - {"layer_head_dims", "layer_kv_heads", "model_type"}
        kwargs = {k: v for k, v in text.items() if k in names and v is not None}
        if "canvas_length" in outer:
            kwargs["canvas_length"] = outer["canvas_length"]
        kwargs.setdefault("rope_parameters", json.loads(json.dumps(DEFAULT_ROPE)))
        args = cls(**kwargs)

        # Full-attention overrides, in either of the two forms a config.json can carry.
        head_dims = [args.head_dim] * args.num_hidden_layers
        kv_heads = [args.num_key_value_heads] * args.num_hidden_layers
        per_layer = text.get("per_layer_config")
        if per_layer is None:
            global_head_dim = text.get("global_head_dim", 512)
            # The reference only honours the kv-head override when attention_k_eq_v is absent or true.
            global_kv = text.get("num_global_key_value_heads") if text.get("attention_k_eq_v", True) else None
            per_layer = {
                i: {"head_dim": global_head_dim, **({"num_key_value_heads": global_kv} if global_kv else {})}
                for i, t in enumerate(args.layer_types)
                if t == FULL
            }
        for key, override in per_layer.items():
            if key in (SLIDING, FULL):
                targets = [i for i, t in enumerate(args.layer_types) if t == key]
            else:
                try:
                    targets = [int(key)]
                except ValueError:
                    raise ConfigError(f"{source}: text_config.per_layer_config has an unknown key {key!r}") from None
                if not 0 <= targets[0] < args.num_hidden_layers:
                    raise ConfigError(f"{source}: text_config.per_layer_config names layer {key} of {args.num_hidden_layers}")
            for i in targets:
                head_dims[i] = override.get("head_dim", head_dims[i])
                kv_heads[i] = override.get("num_key_value_heads", kv_heads[i])
        return replace(args, layer_head_dims=head_dims, layer_kv_heads=kv_heads)

    @classmethod
    def from_file(cls, path: Path) -> "ModelArgs":
        return cls.from_dict(read_json(path), source=str(path))


SAMPLERS = ("reference", "fast")
OUR_GENERATION_KEY = "mlx_dgemma"  # our own settings in generation_config.json (the exporter drops the key)


@dataclass
class FastSamplerConfig:
    """The fast sampler's levers (`fast_loop.py`), each on its own switch so its effect can be measured alone.

    `top_k`: statistics (entropy, argmax, sample) over the K most likely tokens plus a tail bound, instead of the
    whole vocabulary (None: the whole vocabulary). `gathered_sc`: self-conditioning from the top-K embedding
    rows instead of the vocabulary-sized product (needs `top_k`). `freeze`: accepted positions are committed for
    good (not re-noised, not re-decided); the canvas is done when every position is. `confirm`: a position is
    committed only when accepted in two consecutive steps, the second time with the token it was given as its
    argmax (so its keys/values already see that token); without it, at its first acceptance (needs `freeze`).
    `confirm_steps`: with `confirm`, the acceptances in a row a position needs, all but the first with the token
    it holds as the argmax (2: the second acceptance commits). `commit_entropy`: with `confirm`, a position is
    committed only while its entropy is below this (nats); one confirmed above it stays pending (re-decided every
    step, as the reference treats every position; see `resample_pending`) until it is sure enough or the canvas
    ends.
    `compact`: only positions not committed (without `confirm`, plus each just-committed one once more, so its
    keys/values see its token) run through the decoder; the others' keys/values are reused (needs `freeze`).
    `eos_cut`: positions after a
    committed end-of-generation id are not computed, and become pad when the canvas ends (needs `freeze`);
    `eos_cut_pending`: also after one accepted and awaiting its confirmation (they open again if it is not).
    `eos_pad`: positions newly past such an id take the pad token and run through the decoder once more, so the
    others attend to pad there instead of to the noise they last held. `refresh_every`: with `compact`, every
    this many steps all positions run through the decoder again, committed ones included, so the keys/values
    kept for them see the canvas as it is now.
    `argmax_commit`: accepted positions take the argmax rather than the sample. `step_cap`: at most this many
    steps per canvas (the temperature schedule compresses to it), then every open position takes its argmax;
    `repair` recomputes those positions once more against the finished canvas and takes the new argmax.
    `repair_all`: when a canvas is done (by any rule), every position up to its held end-of-generation id runs
    once more through the decoder against the finished canvas and takes the new argmax, so a committed token the
    rest of the canvas now contradicts is revised, as the reference's final argmax over the whole canvas would
    (needs `freeze`).
    `resample_pending`: with `confirm`, a position accepted again with the token it holds as its argmax but not
    committed (its entropy is at or above `commit_entropy`) takes its new sample, as the reference re-decides
    every position it accepts; without it, it keeps its token, and an unsure position can hold a token for the
    rest of the canvas (its argmax follows the token the canvas shows).
    """

    top_k: int | None = 64
    gathered_sc: bool = True
    freeze: bool = True
    confirm: bool = True
    confirm_steps: int = 2
    commit_entropy: float | None = 0.01  # BENCHMARKS.md, "Fast sampler quality gate": Sudoku -1.9 -> -0.1 points
    compact: bool = True
    eos_cut: bool = True
    eos_cut_pending: bool = False  # with commit_entropy an EOS can stay pending for long: sort -1.6 -> -0.5
    eos_pad: bool = False
    refresh_every: int | None = None
    argmax_commit: bool = False
    step_cap: int | None = None
    repair: bool = False
    repair_all: bool = False
    resample_pending: bool = True  # BENCHMARKS.md, "Fast sampler quality gate": add -0.8 -> +0.7, sort -0.9 -> 0.0

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"fast_sampler.{name}={getattr(self, name)!r}: {why}")

        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k <= 0):
            bad("top_k", "must be a positive integer or null")
        if self.gathered_sc and self.top_k is None:
            bad("gathered_sc", "needs top_k")
        for name in ("confirm", "compact", "eos_cut", "repair_all"):
            if getattr(self, name) and not self.freeze:
                bad(name, "needs freeze")
        if self.commit_entropy is not None and (not isinstance(self.commit_entropy, (int, float))
                                                or not self.commit_entropy > 0):
            bad("commit_entropy", "must be a positive number or null")
        if not isinstance(self.confirm_steps, int) or self.confirm_steps < 2:
            bad("confirm_steps", "must be an integer >= 2")
        for name in ("step_cap", "refresh_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                bad(name, "must be a positive integer or null")

    @classmethod
    def from_dict(cls, d: dict, source: str = "generation_config.json") -> "FastSamplerConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"{source}: unknown fast_sampler setting(s) {sorted(unknown)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None


@dataclass
class SamplerConfig:
    """Block-diffusion sampling settings, resolved the way the reference's `generate` resolves them."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    sampler: str = "reference"  # or "fast" (`fast_loop.py`, with the levers of `fast_sampler`)
    fast_sampler: FastSamplerConfig = field(default_factory=FastSamplerConfig)

    def __post_init__(self):
        if isinstance(self.eos_token_ids, int):
            self.eos_token_ids = [self.eos_token_ids]
        self.validate()

    def validate(self):
        def bad(name, why):
            raise ValueError(f"{name}={getattr(self, name)!r}: {why}")

        eos = self.eos_token_ids
        if not isinstance(eos, (list, tuple)) or not all(isinstance(i, int) and i >= 0 for i in eos):
            bad("eos_token_ids", "must be a list of token ids (integers >= 0)")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            bad("max_new_tokens", "must be a positive integer")
        if not isinstance(self.max_denoising_steps, int) or self.max_denoising_steps <= 0:
            bad("max_denoising_steps", "must be a positive integer")
        if not self.entropy_bound > 0:
            bad("entropy_bound", "must be > 0")
        if self.t_min < 0:
            bad("t_min", "must be >= 0")
        if not self.t_max > self.t_min:
            bad("t_max", f"must be greater than t_min={self.t_min}")
        if not isinstance(self.stability_threshold, int) or self.stability_threshold < 0:
            bad("stability_threshold", "must be an integer >= 0")
        if not self.confidence_threshold > 0:
            bad("confidence_threshold", "must be > 0")
        if self.sampler not in SAMPLERS:
            bad("sampler", f"must be one of {list(SAMPLERS)}")
        if not isinstance(self.fast_sampler, FastSamplerConfig):
            bad("fast_sampler", "must be a FastSamplerConfig")

    def updated(self, **overrides) -> "SamplerConfig":
        """A copy with the non-None overrides applied (per-call settings beat the checkpoint's defaults)."""
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown sampler setting(s): {sorted(unknown)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_generation_config(cls, gen: dict | None, args: ModelArgs | None = None) -> "SamplerConfig":
        gen = dict(gen or {})
        sampler = gen.get("sampler_config") or {}
        if sampler and sampler.get("_cls_name", "EntropyBoundSamplerConfig") != "EntropyBoundSamplerConfig":
            raise ConfigError(f"generation_config.json: sampler_config {sampler.get('_cls_name')!r} is not supported")
        eos = gen.get("eos_token_id")
        pad = gen.get("pad_token_id")
        if args is not None:
            # Where generation_config.json (or its eos/pad entry) is missing or null, the reference stops at no
            # EOS at all; users of mlx-lm expect the config's EOS to end generation, so fall back to config.json.
            eos = args.eos_token_id if eos is None else eos
            pad = args.pad_token_id if pad is None else pad
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        kwargs = {
            k: gen[k]
            for k in ("max_new_tokens", "max_denoising_steps", "t_min", "t_max", "stability_threshold", "confidence_threshold")
            if gen.get(k) is not None
        }
        if sampler.get("entropy_bound") is not None:
            kwargs["entropy_bound"] = sampler["entropy_bound"]
        ours = gen.get(OUR_GENERATION_KEY) or {}
        if not isinstance(ours, dict):
            raise ConfigError(f"generation_config.json: {OUR_GENERATION_KEY} must be an object")
        unknown = set(ours) - {"sampler", "fast_sampler"}
        if unknown:
            raise ConfigError(f"generation_config.json: {OUR_GENERATION_KEY} has unknown key(s) {sorted(unknown)}")
        if ours.get("sampler") is not None:
            kwargs["sampler"] = ours["sampler"]
        if ours.get("fast_sampler") is not None:
            kwargs["fast_sampler"] = FastSamplerConfig.from_dict(
                ours["fast_sampler"], f"generation_config.json: {OUR_GENERATION_KEY}.fast_sampler")
        try:
            return cls(**kwargs, eos_token_ids=eos_ids, pad_token_id=pad)
        except ValueError as e:
            raise ConfigError(f"generation_config.json: {e}") from None

    @classmethod
    def from_folder(cls, folder: Path, args: ModelArgs | None = None) -> "SamplerConfig":
        path = Path(folder) / "generation_config.json"
        return cls.from_generation_config(read_json(path) if path.is_file() else None, args)
