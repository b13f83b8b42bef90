"""Read a checkpoint one tensor at a time, and tell what kind of module each parameter belongs to.

Local HF directories with safetensors (one file or sharded with ``model.safetensors.index.json``) are read
tensor by tensor (memory-mapped): peak memory stays near the tensors in hand. Other references (a GGUF
file, which must be dequantized, a hub id in the local cache, a directory with only ``pytorch_model.bin``)
are loaded whole through ``app.models`` and then served from memory; the summary says which.

Module kinds come from the model's own classes, built on the meta device from the config (no weights):
``linear`` (torch Linear), ``conv1d`` (transformers' GPT-2 Conv1D, weight stored (in, out)), ``embedding``,
``other`` (norms and anything else with parameters).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator


class DeltaError(ValueError):
    """A delta cannot be extracted or applied as asked (shape/vocabulary mismatch, nothing to do, ...)."""


class Checkpoint:
    def __init__(self, reference: str):
        from transformers import AutoConfig

        from app.models import resolve

        self.reference = reference
        name, kwargs = resolve(reference)
        self.config = AutoConfig.from_pretrained(name, **kwargs)
        self._files: dict[str, str] = {}
        self._memory: dict = {}
        files = sorted(glob.glob(os.path.join(name, "*.safetensors"))) if os.path.isdir(name) and not kwargs else []
        if files:
            from safetensors import safe_open

            index = os.path.join(name, "model.safetensors.index.json")
            if os.path.isfile(index):
                with open(index) as f:
                    self._files = {k: os.path.join(name, v) for k, v in json.load(f)["weight_map"].items()}
            else:
                for path in files:
                    with safe_open(path, "pt") as h:
                        self._files.update({k: path for k in h.keys()})
            self.streamed = True
        else:
            from app.models import load_causal_lm

            lm = load_causal_lm(reference)
            self._memory = {k: v.detach() for k, v in lm.model.state_dict().items()}
            self.streamed = False

    def keys(self) -> list[str]:
        return sorted(self._files or self._memory)

    def __contains__(self, key: str) -> bool:
        return key in self._files or key in self._memory

    def get(self, key: str):
        if key in self._memory:
            return self._memory[key]
        from safetensors import safe_open

        with safe_open(self._files[key], "pt") as h:
            return h.get_tensor(key)


def module_kinds(config) -> tuple[dict[str, str], dict[str, list[str]], list[tuple[str, str]]]:
    """(module name -> kind, module name -> its own parameter names, tied (module, module) pairs)."""
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
