"""Tiny models built in the tests: a word-level tokenizer and Llama, GPT-2, Granite, Mamba-2 and hybrid models,
saved with save_pretrained."""

from __future__ import annotations

import os

WORDS = ("the quick brown fox jumps over lazy dog and a cat sat on mat it was very good day to be in "
         "park with friends of mine who like reading books about history science art music").split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_llama(path: str, seed: int = 0) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return _save(LlamaForCausalLM(cfg), tok, path)


def _save(model, tok, path: str) -> str:
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_gpt2(path: str, n_positions: int = 64, seed: int = 0) -> str:
    """A 1-layer GPT-2 whose context is ``n_positions`` tokens (learned positions: a longer input is an IndexError
    in its embedding), with the word-level tokenizer (one token per word)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=32, n_layer=1, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return _save(GPT2LMHeadModel(cfg), tok, path)


def tiny_granite(path: str, seed: int = 0) -> str:
    """A 2-layer Granite: its forward divides lm_head's output by logits_scaling (and scales embeddings, residuals
    and attention inside its body)."""
    import torch
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    cfg = GraniteConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        logits_scaling=4.0, embedding_multiplier=3.0, residual_multiplier=0.5,
                        attention_multiplier=0.25, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    return _save(GraniteForCausalLM(cfg), tok, path)


DETOX_CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]


def tiny_detoxify(root: str, seed: int = 0, max_length: int = 32) -> tuple[str, str]:
    """A tiny BERT checkpoint in Detoxify's own format (+ its HF config/tokenizer dir): (ckpt, hf_dir)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    torch.manual_seed(seed)
    hf_dir = os.path.join(root, "hf")
    os.makedirs(hf_dir, exist_ok=True)
    with open(os.path.join(hf_dir, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "idiot", "stupid", "hate"]) + "\n")
    tok = BertTokenizerFast(vocab_file=os.path.join(hf_dir, "vocab.txt"), model_max_length=max_length)
    tok.save_pretrained(hf_dir)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=len(DETOX_CLASSES))
    cfg.save_pretrained(hf_dir)
    model = BertForSequenceClassification(cfg)
    ckpt = os.path.join(root, "tiny-detoxify.ckpt")
    torch.save({"config": {"arch": {"args": {"model_type": hf_dir, "model_name": "BertForSequenceClassification",
                                             "tokenizer_name": "BertTokenizerFast", "num_classes": len(DETOX_CLASSES)}},
                           "dataset": {"args": {"classes": DETOX_CLASSES}}},
                "state_dict": model.state_dict()}, ckpt)
    return ckpt, hf_dir


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")


def tiny_mamba2(path: str, seed: int = 0, head_scale: float = 10.0) -> str:
    """A 2-layer Mamba2ForCausalLM (width 32) with the word-level tokenizer and a chat template, saved with
    save_pretrained: a stand-in for a distilled student. ``head_scale`` sharpens its random logits so that greedy
    decoding has clear winners (top-2 gaps far above float noise)."""
    import torch
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    cfg = Mamba2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                       state_size=16, n_groups=1, expand=2, conv_kernel=4, chunk_size=8,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Mamba2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_hybrid(path: str, attention=0.5, seed: int = 0, head_scale: float = 10.0) -> str:
    """A hybrid student (BambaForCausalLM) of a tiny 2-layer Llama, built by ``app.distill.student`` keeping
    ``attention`` of the attention layers (0.5: layer 1; 0: none), with the word-level tokenizer and a chat
    template, saved with save_pretrained. ``head_scale`` sharpens its logits as in ``tiny_mamba2``."""
    import torch
    from transformers import LlamaForCausalLM

    from app.distill.student import build_student

    teacher = LlamaForCausalLM.from_pretrained(tiny_llama(os.path.join(path, "teacher"), seed=seed))
    student, _ = build_student(teacher, "hybrid", attention_layers=attention, seed=seed)
    with torch.no_grad():
        student.lm_head.weight.mul_(head_scale)
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    os.makedirs(path, exist_ok=True)
    student.save_pretrained(path)
    tok.save_pretrained(path)
    return path
