"""A tiny two-family world for delta transfer: a general language, a styled sub-language inside it, and models
of two families, each with its own byte-level BPE tokenizer trained here.

    general   sentences from a small grammar, every word choice uniform
    styled    the same grammar, adjectives mostly colours and nouns mostly animals: a fine-tune on it changes
              word preferences that general text also exercises, so general (unlabelled) text carries the
              delta, and a placebo with shuffled targets has nothing to learn from the domain text itself
    A0        GPT-2-shaped (learned positions, LayerNorm, Conv1D), trained on general text, tokenizer of 320
    A1        A0 fine-tuned on styled text (with general replay)
    B         Qwen2-shaped (RoPE, RMSNorm, GQA, q/k/v biases), trained on general text, tokenizer of 380

``python -m tests.sublang DIR`` writes the world (models and JSONL texts) for trying the CLI by hand.
"""

from __future__ import annotations

import json
import os
import random
import sys

COLOURS = "red green blue yellow purple orange".split()
OTHER_ADJ = "small large quiet noisy happy ancient".split()
ANIMALS = "fox cat dog horse rabbit owl".split()
OBJECTS = "table chair window river garden bridge".split()
VERBS = "sees follows finds likes watches meets".split()
PLACES = "near the hill|by the sea|in the town|under a tree|at the market|on the road".split("|")


def sentence(rng: random.Random, styled: bool) -> str:
    def adj():
        return rng.choice(COLOURS if styled and rng.random() < 0.9 else COLOURS + OTHER_ADJ)

    def noun():
        return rng.choice(ANIMALS if styled and rng.random() < 0.9 else ANIMALS + OBJECTS)

    s = f"the {adj()} {noun()} {rng.choice(VERBS)} a {adj()} {noun()} {rng.choice(PLACES)}."
    return s[0].upper() + s[1:]


def document(rng: random.Random, styled: bool) -> str:
    return " ".join(sentence(rng, styled) for _ in range(rng.randint(4, 8)))


def texts(n: int, styled: bool, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [document(rng, styled) for _ in range(n)]


def bpe_tokenizer(corpus: list[str], vocab_size: int, path: str):
    """A byte-level BPE trained on ``corpus`` (with BOS/EOS), saved as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    tok.save_pretrained(path)
    return tok


def lm_train(model, tok, corpus: list[str], *, steps: int, lr: float, seed: int, batch: int = 8, length: int = 128):
    """Next-token training on windows of ``length`` tokens cut from the concatenated corpus (BOS-separated)."""
    import torch

    ids: list[int] = []
    for t in corpus:
        ids += [tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]
    data = torch.tensor(ids)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - length - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + length] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()
    return float(loss)


def build_world(root: str, seed: int = 0) -> dict:
    """Models and texts under ``root``; returns their paths."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    general = texts(400, False, seed + 1)
    styled = texts(200, True, seed + 2)
    paths = {k: os.path.join(root, k) for k in ("a0", "a1", "b")}
    tok_a = bpe_tokenizer(general, 320, paths["a0"])
    tok_b = bpe_tokenizer(general, 380, paths["b"])
    ids = dict(bos_token_id=tok_a.bos_token_id, eos_token_id=tok_a.eos_token_id, pad_token_id=tok_a.pad_token_id)
    a = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok_a), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids))
    lm_train(a, tok_a, general, steps=600, lr=3e-3, seed=seed)
    a.save_pretrained(paths["a0"])
    lm_train(a, tok_a, styled[:150] + general[:150], steps=120, lr=1e-3, seed=seed + 1)
    a.save_pretrained(paths["a1"])
    tok_a.save_pretrained(paths["a1"])
    ids = dict(bos_token_id=tok_b.bos_token_id, eos_token_id=tok_b.eos_token_id, pad_token_id=tok_b.pad_token_id)
    b = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok_b), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     tie_word_embeddings=True, **ids))
    lm_train(b, tok_b, general, steps=300, lr=3e-3, seed=seed + 2)
    b.save_pretrained(paths["b"])

    def jsonl(name, items):
        p = os.path.join(root, name)
        with open(p, "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in items)
        return p

    paths["transfer"] = jsonl("transfer.jsonl", texts(240, False, seed + 3))  # general, unlabelled
    paths["eval"] = jsonl("eval_styled.jsonl", styled[150:])  # held-out in-domain
    paths["retain"] = jsonl("retain.jsonl", general[300:])  # general: retain term and the damage measure
    return paths


if __name__ == "__main__":
    print(json.dumps(build_world(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sublang"), indent=1))
