"""Image prompts: each image's placeholder expanded to its soft tokens, the tokens' features spliced into the
encoder's input, and the encoder mask over image blocks.

Layout (the reference's `Gemma4Processor`): the chat template writes one `<|image|>` per image; it becomes
`<|image>` + `<|image|>` x n + `<image|>`, n being that image's soft-token count. Only the `<|image|>` run is an
image *block* (boi/eoi are text), so adjacent images are separate blocks.

Mask policies for the encoder (q attends k):
* "hf", transformers 5.24.0 DiffusionGemma (`create_masks_for_generate` with `block_sequence_ids`), the default:
  full layers `causal | same_block`; sliding layers `(causal & window) | same_block`, so one image's tokens see
  each other on every layer, even beyond the window.
* "gemma4", Gemma 4 proper (`create_masks_for_vision_model`; the official JAX config says the same): full layers
  causal only; sliding layers `(causal | same_block) & window`.
Padding is applied on top of both. The reference builds this mask only inside `generate()` (a direct encoder
forward drops it); we build it in every encode that carries images.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..config import FULL, SLIDING
from .processor import ImageError

MASK_POLICIES = ("hf", "gemma4")


def expand_image_tokens(ids: list[int], soft_tokens: list[int], boi: int, image: int, eoi: int) -> list[int]:
    """Each `<|image|>` placeholder in `ids` -> boi, `image` x n, eoi, with n from `soft_tokens` in order."""
    found = sum(1 for t in ids if t == image)
    if found != len(soft_tokens):
        raise ImageError(
            f"the prompt has {found} image placeholder(s) (<|image|>, id {image}) but {len(soft_tokens)} image(s) "
            "were given; put one placeholder per image, or let the chat template place them"
        )
    out, n = [], iter(soft_tokens)
    for t in ids:
        out.extend([boi, *[image] * next(n), eoi] if t == image else [t])
    return out


def block_ids(is_image: np.ndarray) -> np.ndarray:
    """Number each contiguous run of image tokens in a row 0, 1, 2, ...; -1 for text (the reference's
    `get_block_sequence_ids_for_mask`)."""
    starts = is_image.copy()
    starts[:, 1:] &= ~is_image[:, :-1]
    return np.where(is_image, np.cumsum(starts, axis=1) - 1, -1)


@dataclass
class PromptImages:
    """The image soft tokens of a batch of prompt rows, aligned with the columns handed to `Model.encode`.

    `features` `[N, H]` are all images' soft tokens in row-major order; `index` `[B, L]` (host) names the feature
    row of each image token and is -1 elsewhere; `blocks` `[B, L]` numbers the image blocks per row.
    """

    features: mx.array
    index: np.ndarray
    blocks: np.ndarray
    policy: str = "hf"

    @classmethod
    def for_prompt(cls, ids: np.ndarray, features: mx.array, image_token_id: int, policy: str = "hf"):
        if policy not in MASK_POLICIES:
            raise ValueError(f"mask policy {policy!r} is not one of {MASK_POLICIES}")
        ids = np.asarray(ids)
        is_image = ids == image_token_id
        count = int(is_image.sum())
        if count != features.shape[0]:
            raise ImageError(f"the prompt has {count} image tokens but the images give {features.shape[0]} soft tokens")
        index = np.full(ids.shape, -1, dtype=np.int64)
        index[is_image] = np.arange(count)
        return cls(features, index, block_ids(is_image), policy)

    def columns(self, start: int, stop: int) -> "PromptImages | None":
        """The part for prompt columns [start, stop); None when they hold no image token."""
        index = self.index[:, start:stop]
        if (index < 0).all():
            return None
        return PromptImages(self.features, index, self.blocks[:, start:stop], self.policy)

    def chunks(self, length: int, step: int) -> list[tuple[int, int]]:
        """Encoder chunks of about `step` columns that never cut an image block (a block spans one chunk)."""
        inside = (self.blocks[:, 1:] >= 0) & (self.blocks[:, 1:] == self.blocks[:, :-1])  # column c+1 continues c
        cuttable = ~inside.any(axis=0)  # a cut before column c+1 splits no block
        bounds, start = [], 0
        while start < length:
            stop = min(start + step, length)
            while stop < length and not cuttable[stop - 1]:
                stop += 1  # extend to the end of the block rather than cut it
            bounds.append((start, stop))
            start = stop
        return bounds

    def splice(self, h: mx.array) -> mx.array:
        """Replace the embeddings at image tokens with the soft tokens (which, unlike token embeddings, carry no
        sqrt(hidden) scale)."""
        B, L, H = h.shape
        flat = np.arange(B * L)
        rows = self.index.reshape(-1)
        picks = np.where(rows >= 0, B * L + rows, flat)
        table = mx.concatenate([h.reshape(B * L, H), self.features.astype(h.dtype)], axis=0)
        return table[mx.array(picks)].reshape(B, L, H)

    def masks(self, masks: dict, offset: int, cached: dict, sliding_window: int) -> dict:
        """The encoder's masks (`Cache.encoder_mask` per layer type: None, "causal" or boolean arrays) with the
        image-block rule of `policy` laid over them. `offset` is the position of the first new column, `cached`
        the kept keys per layer type."""
        B, L = self.blocks.shape
        out = {}
        for layer_type, base in masks.items():
            if self.policy == "gemma4" and layer_type == FULL:
                out[layer_type] = base
                continue
            K = cached[layer_type] + L
            q = np.arange(offset, offset + L)[:, None]
            k = np.arange(offset + L - K, offset + L)[None, :]
            if base is None:
                base = mx.ones((L, K), dtype=mx.bool_)
            elif isinstance(base, str):  # "causal"
                base = mx.array(k <= q)
            key_blocks = np.concatenate([np.full((B, K - L), -1), self.blocks], axis=1)
            same = (self.blocks[:, :, None] == key_blocks[:, None, :]) & (self.blocks[:, :, None] >= 0)
            if layer_type == SLIDING and self.policy == "gemma4":
                same &= (k > q - sliding_window)[None]
            base = base if base.ndim == 4 else base[None, None]
            out[layer_type] = base | mx.array(same)[:, None]
        return out
