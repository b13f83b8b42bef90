"""Read a checkpoint one tensor at a time, and tell what kind of module each parameter belongs to.

Local HF directories with safetensors (one file or sharded with ``model.safetensors.index.json``) are read
tensor by tensor (memory-mapped): peak memory stays near the tensors in hand. Other references (a GGUF
file, which must be dequantized, a hub id in the local cache, a directory with only ``pytorch_model.bin``)
are loaded whole through ``app.models`` and then served from memory; the summary says which.

Module kinds: ``linear`` (torch Linear), ``conv1d`` (transformers' GPT-2 Conv1D, weight stored (in, out)),
``embedding``, ``other`` (norms and anything else with parameters). The reference way to know them is the
model's own classes, built on the meta device from the config (no weights). For a streamed checkpoint of a
family in ``LAYOUTS`` they are read off the checkpoint's keys and shapes instead, without importing
transformers: that import and the config/model classes cost about 3.5 s, more than half of a whole
extraction of a 135M model on 2 cores. tests/test_delta.py checks every family in ``LAYOUTS`` against the
meta model.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator


class DeltaError(ValueError):
    """A delta cannot be extracted or applied as asked (shape/vocabulary mismatch, nothing to do, ...)."""


# model_type -> the names of its transformers Conv1D modules. In these families the input embeddings are the
# modules named in EMBEDDINGS, the output layer is ``lm_head``, and other modules with a 2-D weight are
# Linear. (Not gpt_neox: transformers 5 renames its saved ``embed_out`` to ``lm_head`` when loading.)
LAYOUTS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo2", "granite",
                     "starcoder2"), ()),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}
EMBEDDINGS = {"embed_tokens", "wte", "wpe"}
OUTPUT = "lm_head"


class Checkpoint:
    def __init__(self, reference: str):
        from app.models import resolve

        self.reference = reference
        name, kwargs = resolve(reference)
        self._source = (name, kwargs)
        self._hf_config = None
        self._files: dict[str, str] = {}
        self._memory: dict = {}
        self._handles: dict = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        files = sorted(glob.glob(os.path.join(name, "*.safetensors"))) if os.path.isdir(name) and not kwargs else []
        if files:
            from safetensors import safe_open

            with open(os.path.join(name, "config.json")) as f:
                self.raw_config = json.load(f)
            index = os.path.join(name, "model.safetensors.index.json")
            if os.path.isfile(index):
                with open(index) as f:
                    self._files = {k: os.path.join(name, v) for k, v in json.load(f)["weight_map"].items()}
            else:
                self._files = {k: path for path in files for k in self._handle(path).keys()}
            self.streamed = True
        else:
            from app.models import load_causal_lm

            lm = load_causal_lm(reference)
            self._memory = {k: v.detach() for k, v in lm.model.state_dict().items()}
            self._hf_config = lm.model.config
            self.raw_config = lm.model.config.to_dict()
            self.streamed = False
        self.model_type = self.raw_config.get("model_type")

    @property
    def hf_config(self):
        """The transformers config (imports transformers on first use)."""
        if self._hf_config is None:
            from transformers import AutoConfig

            name, kwargs = self._source
            self._hf_config = AutoConfig.from_pretrained(name, **kwargs)
        return self._hf_config

    def _handle(self, path: str):
        if path not in self._handles:
            from safetensors import safe_open

            self._handles[path] = safe_open(path, "pt")
        return self._handles[path]

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._memory:
            return tuple(self._memory[key].shape)
        return tuple(self._handle(self._files[key]).get_slice(key).get_shape())

    def keys(self) -> list[str]:
        return sorted(self._files or self._memory)

    def __contains__(self, key: str) -> bool:
        return key in self._files or key in self._memory

    def get(self, key: str):
        if key in self._memory:
            return self._memory[key]
        from safetensors import safe_open

        # a handle of its own, closed at once: a long-lived one keeps every page it has read mapped, and the
        # process's resident memory grows towards both whole checkpoints
        with safe_open(self._files[key], "pt") as h:
            return h.get_tensor(key)


def module_kinds(ckpt: Checkpoint) -> tuple[dict[str, str], dict[str, list[str]], list[tuple[str, str]]]:
    """(module name -> kind, module name -> its own parameter names, tied (module, module) pairs)."""
    if ckpt.streamed and ckpt.model_type in LAYOUTS:
        return layout_kinds(ckpt)
    return meta_kinds(ckpt.hf_config)


def layout_kinds(ckpt: Checkpoint) -> tuple[dict[str, str], dict[str, list[str]], list[tuple[str, str]]]:
    """module_kinds from the checkpoint's keys and shapes and a LAYOUTS entry (no transformers)."""
    conv1d = LAYOUTS[ckpt.model_type]
    params: dict[str, list[str]] = {}
    for key in ckpt.keys():
        if "." in key:
            mod, p = key.rsplit(".", 1)
            params.setdefault(mod, []).append(p)
    kinds = {}
    for mod, own in params.items():
        leaf = mod.rsplit(".", 1)[-1]
        matrix = "weight" in own and len(ckpt.shape(f"{mod}.weight")) == 2
        kinds[mod] = ("embedding" if matrix and leaf in EMBEDDINGS else "conv1d" if matrix and leaf in conv1d
                      else "linear" if matrix else "other")
    embeds = [m for m, k in kinds.items() if k == "embedding" and m.rsplit(".", 1)[-1] != "wpe"]
    if len(embeds) != 1:  # not the layout this table assumes: ask the model classes
        return meta_kinds(ckpt.hf_config)
    tie = ckpt.raw_config.get("tie_word_embeddings")
    if tie is None:  # not written (the class default): save_pretrained leaves a tied output layer out
        tie = f"{OUTPUT}.weight" not in ckpt
    tied = []
    if tie:
        tied.append((embeds[0], OUTPUT))
        params.setdefault(OUTPUT, ["weight"])
        kinds.setdefault(OUTPUT, "linear")
    return kinds, params, tied


def meta_kinds(config) -> tuple[dict[str, str], dict[str, list[str]], list[tuple[str, str]]]:
    """module_kinds from the model's classes, built on the meta device (the reference)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    kinds, params = {}, {}
    for name, mod in model.named_modules():
        own = [p for p, _ in mod.named_parameters(recurse=False)]
        if not own:
            continue
        params[name] = own
        kinds[name] = ("conv1d" if isinstance(mod, Conv1D) else "linear" if isinstance(mod, nn.Linear)
                       else "embedding" if isinstance(mod, nn.Embedding) else "other")
    tied = []
    if getattr(config, "tie_word_embeddings", False):
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        names = {id(m): n for n, m in model.named_modules()}
        if inp is not None and out is not None:
            tied.append((names[id(inp)], names[id(out)]))
    return kinds, params, tied


def iter_param_keys(ckpt: Checkpoint, params: dict[str, list[str]]) -> Iterator[tuple[str, str, str]]:
    """(key, module name, parameter name) for every checkpoint key that is a parameter of a module."""
    for key in ckpt.keys():
        if "." not in key:
            continue
        mod, p = key.rsplit(".", 1)
        if p in params.get(mod, ()):
            yield key, mod, p
