"""The images of a chat conversation, for `ChatSession`.

A user turn's images become content parts `{"type": "image", "image": source}` before its text; the chat template
writes one `<|image|>` for each. Each image is read once, when its turn is sent (a bad file fails before anything
is encoded), and its soft tokens are computed once, when first encoded; a turn that re-renders the conversation
expands every placeholder again from the remembered counts, so the rendering the cache is matched against always
holds the image tokens.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from . import check_context, require_vision
from .prompt import PromptImages, expand_image_tokens


class ConversationImages:
    def __init__(self, model, max_soft_tokens: int | None = None):
        self.model = model
        self.max_soft_tokens = max_soft_tokens
        self._seen: dict[int, tuple] = {}  # id(part) -> (part, Patches, soft tokens or None)

    def parts(self, images) -> list[dict]:
        """Content parts for a new user turn's images, read now."""
        encoder = require_vision(self.model)
        out = []
        for source in images:
            (patches,) = encoder.process([source], self.max_soft_tokens)
            part = {"type": "image", "image": source}
            self._seen[id(part)] = (part, patches, None)
            out.append(part)
        return out

    def forget(self):
        self._seen.clear()

    def _in(self, messages) -> list[dict]:
        return [p for m in messages if isinstance(m.get("content"), list) for p in m["content"]
                if isinstance(p, dict) and id(p) in self._seen]

    def expand(self, ids: list[int], messages) -> list[int]:
        """The rendered conversation with each image's placeholder expanded to its soft tokens."""
        parts = self._in(messages)
        if not parts:
            return ids
        encoder = self.model.vision
        counts = [self._seen[id(p)][1].soft_tokens for p in parts]
        return expand_image_tokens(ids, counts, encoder.boi_token_id, encoder.image_token_id, encoder.eoi_token_id)

    def prompt_images(self, ids: list[int], messages, max_new_tokens: int) -> PromptImages | None:
        """The soft tokens of every image in an expanded rendering (None without images); checks the context."""
        parts = self._in(messages)
        if not parts:
            return None
        encoder = self.model.vision
        check_context(encoder, ids, max_new_tokens)
        features = []
        for p in parts:
            part, patches, soft = self._seen[id(p)]
            if soft is None:
                soft = encoder.features([patches])
                mx.eval(soft)  # nothing lazy left behind: the next turn may run on another thread
                self._seen[id(p)] = (part, patches, soft)
            features.append(soft)
        return encoder.prompt_images(np.array([ids]), mx.concatenate(features, axis=0))
