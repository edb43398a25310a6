"""Tiny models for tests: a small BPE tokenizer with a ChatML template and random Llama models,
saved with save_pretrained so that the real loading code runs."""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "what is the capital of france", "explain gravity in one sentence", "list three fruits",
    "the quick brown fox jumps over the lazy dog", "write a python function that adds numbers",
    "paris is the capital", "apples bananas and cherries", "one two three four five six seven",
]


def make_tokenizer(path: Path, vocab_size: int = 120, extra_token: str | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<|im_start|>", "<|im_end|>"] + ([extra_token] if extra_token else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return fast


def make_model(path: Path, tokenizer, layers: int = 4, hidden: int = 32, seed: int = 0, head_pad: int = 0,
               heads: int = 4, kv_heads: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer) + head_pad, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def write_prompts(path: Path, n: int = 12):
    words = ["apple", "river", "cloud", "stone", "green", "music", "table", "light", "north", "piano",
             "sugar", "tiger", "ocean", "paper", "smile", "train"]
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": f"explain {words[i % len(words)]} number {i}"}) + "\n")
    return path
