"""Image input: the Gemma 4 vision tower (`tower`), its processor (`processor`) and image prompts (`prompt`).

`load_vision(folder)` gives an `ImageEncoder` (or None for a folder without vision weights); `load()` attaches it
to the model as `model.vision`. It is kept outside the text model's module tree, so training, LoRA, quantization
and export see the text stack alone, and its weights stay lazy until the first image.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from ..config import read_json
from ..model import VISION_PREFIXES, checkpoint_name
from ..weights import CheckpointError, list_tensors
from .processor import ImageError, ImageSettings, Patches, process_image
from .prompt import PromptImages, expand_image_tokens
from .tower import VisionArgs, VisionModel

__all__ = ["ImageEncoder", "ImageError", "ImageSettings", "Patches", "PromptImages", "check_context", "load_vision",
           "prepare_images", "process_image", "require_vision"]

# config.json defaults (Gemma 4's ids), used when a config names none.
DEFAULT_TOKEN_IDS = {"boi_token_id": 255_999, "eoi_token_id": 258_882, "image_token_id": 258_880}


class ImageEncoder:
    """Turns images into soft tokens for one model folder.

    `mask_policy` picks the encoder mask over an image's tokens: "hf" (transformers 5.24.0 DiffusionGemma, the
    default: on every layer an image's tokens see each other, even across the sliding window) or "gemma4" (Gemma 4
    proper: only sliding layers, and only within the window). See `prompt.encoder_masks`.
    """

    def __init__(self, model: VisionModel, settings: ImageSettings, token_ids: dict, context_length: int | None = None,
                 folder=None):
        self.model = model
        self.context_length = context_length  # the text model's max_position_embeddings
        self.args = model.args
        self.settings = settings
        self.boi_token_id = token_ids["boi_token_id"]
        self.eoi_token_id = token_ids["eoi_token_id"]
        self.image_token_id = token_ids["image_token_id"]
        self.mask_policy = "hf"
        self.folder = folder

    def process(self, images, max_soft_tokens: int | None = None) -> list[Patches]:
        settings = self.settings.with_budget(max_soft_tokens)
        return [process_image(image, settings) for image in images]

    def features(self, patches: list[Patches]) -> mx.array:
        """Soft tokens `[sum of soft_tokens, text hidden]` for the images in order. Each image runs alone at its own
        patch count (the reference pads to the budget; padding patches are masked out and pooled to nothing, so
        the valid tokens are the same)."""
        outs = [self.model(mx.array(p.pixels)[None], p.positions[None]) for p in patches]
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)

    def prompt_images(self, ids, features: mx.array) -> PromptImages:
        """The soft tokens placed at the image tokens of a padded `[B, L]` prompt batch, under `mask_policy`."""
        return PromptImages.for_prompt(ids, features, self.image_token_id, self.mask_policy)


def load_vision(folder, config: dict | None = None, text_hidden: int | None = None, tensors=None) -> ImageEncoder | None:
    """The folder's vision tower and projector, or None when it has none. Weights load lazily."""
    folder = Path(folder)
    config = read_json(folder / "config.json") if config is None else config
    vision_config = config.get("vision_config")
    tensors = list_tensors(folder) if tensors is None else tensors
    ours = {}
    for t in tensors:
        name = checkpoint_name(t.name)
        if name is not None and name.startswith(VISION_PREFIXES):
            ours[name] = t
    if not vision_config or not ours:
        return None
    args = VisionArgs.from_dict(vision_config, source=str(folder / "config.json"))
    if text_hidden is None:
        text_hidden = (config.get("text_config") or {})["hidden_size"]
    model = VisionModel(args, text_hidden)
    weights = {}
    for path in sorted({t.file for t in ours.values()}):
        if path.suffix == ".safetensors":
            loaded = mx.load(str(path))
            weights.update({checkpoint_name(k): v for k, v in loaded.items() if checkpoint_name(k) in ours})
    for name, t in ours.items():
        if name not in weights:
            weights[name] = t.read()
    # float16 overflows in the tower (scores and the standardisation reach ~5e4): widen it. bfloat16 and float32
    # are kept as the folder has them.
    weights = {k: v.astype(mx.float32) if v.dtype == mx.float16 else v for k, v in weights.items()}
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise CheckpointError(f"{folder}: the vision weights do not match vision_config ({e})") from None
    model.eval()
    token_ids = {k: config.get(k, v) for k, v in DEFAULT_TOKEN_IDS.items()}
    settings = ImageSettings.from_folder(folder, args.patch_size, args.pooling_kernel_size)
    context = (config.get("text_config") or {}).get("max_position_embeddings")
    return ImageEncoder(model, settings, token_ids, context, folder)


def require_vision(model) -> ImageEncoder:
    encoder = getattr(model, "vision", None)
    if encoder is None:
        raise ImageError(
            "this model takes text only: its folder has no vision tower (no vision_config or no vision_tower "
            "weights), so images cannot be given"
        )
    return encoder


def check_context(encoder: ImageEncoder, row: list[int], max_new_tokens: int, cached: int = 0):
    """An image prompt (after `cached` tokens already encoded) and its reply must fit the model's context."""
    context = encoder.context_length
    if context and cached + len(row) + max_new_tokens > context:
        n_image = sum(1 for t in row if t == encoder.image_token_id)
        before = f" after {cached} tokens already in the cache" if cached else ""
        raise ImageError(
            f"the prompt takes {len(row)} tokens ({n_image} of them image tokens){before} and up to {max_new_tokens} "
            f"new tokens would follow, but the model's context is {context} tokens (max_position_embeddings); use "
            "fewer or smaller images, a smaller max_soft_tokens, or fewer new tokens"
        )


def prepare_images(model, rows: list[list[int]], images, *, max_soft_tokens: int | None = None,
                   max_new_tokens: int = 0, cached: int = 0) -> tuple[list[list[int]], mx.array | None]:
    """Per prompt row, read its images, expand its placeholders to their soft tokens and check the result fits the
    context. Returns the expanded rows and all images' soft tokens `[N, H]` (lazy), in row-major order."""
    encoder = require_vision(model)
    if len(images) != len(rows):
        raise ImageError(f"{len(images)} image lists for {len(rows)} prompts; give one list (maybe empty) per prompt")
    expanded, patches = [], []
    for row, row_images in zip(rows, images):
        row_patches = encoder.process(list(row_images or []), max_soft_tokens)
        row = expand_image_tokens(row, [p.soft_tokens for p in row_patches], encoder.boi_token_id,
                                  encoder.image_token_id, encoder.eoi_token_id)
        check_context(encoder, row, max_new_tokens, cached)
        expanded.append(row)
        patches.extend(row_patches)
    return expanded, (encoder.features(patches) if patches else None)
