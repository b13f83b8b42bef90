"""The cache a model generates with: one place for serving (both schedulers) and distillation (the students'
generation checks), so that neither package imports the other for it.

transformers makes the right cache for every model it knows, except a Bamba model whose layers are all linear
attention (Mamba-2: the 0-attention hybrid student): its causal-mask code asks the cache for the sequence length,
which only attention layers track. For that model ``generation_cache`` returns a ``RecurrentCache``
(``app/recurrent.py``), which counts the tokens itself. Nothing heavy is imported until such a cache is made.
"""

from __future__ import annotations

from typing import Any


def _all_linear_attention(config: Any) -> bool:
    """A Bamba config with no attention layer (``attn_layer_indices`` empty or unset)."""
    return config.model_type == "bamba" and not getattr(config, "attn_layer_indices", None)


def generation_cache(model: Any) -> Any:
    """The cache to pass to ``model.generate(..., cache=...)`` (or a forward with use_cache): a fresh
    ``RecurrentCache`` for a Bamba model without attention layers; None (generate makes its own default) for every
    other model."""
    if _all_linear_attention(model.config):
        from app.recurrent import RecurrentCache

        return RecurrentCache(config=model.config)
    return None
