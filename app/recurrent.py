"""The generation cache of a Bamba model whose layers are all linear attention (Mamba-2): the 0-attention hybrid
student.

transformers 5.24's causal-mask code asks the cache for the sequence length (``get_seq_length``), which only
attention layers track, so ``generate`` fails on such a model. ``RecurrentCache`` counts the tokens itself.
transformers asks every forward's mask sizes exactly once, before the layers run, with that forward's query length
(``get_mask_sizes``); the decode path updates the SSM and conv states in place, so this is the one call that sees
every forward. Written by hand (a subclass, not a fork): nothing in transformers covers this case.

Imported only when such a cache is made (``app.caches.generation_cache``): importing it imports transformers.
Serving and distillation both use it, so it lives outside either package.
"""

from __future__ import annotations

from transformers import DynamicCache


class RecurrentCache(DynamicCache):
    """A DynamicCache that counts the tokens it has seen (see the module doc)."""

    def __init__(self, config):
        super().__init__(config=config)
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        kv = self.seen_tokens + query_length
        self.seen_tokens = kv
        return kv, 0

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a recurrent state cannot be cropped")
