"""A tiny LLaVA-style vision-language model for tests: tests/tiny.py's BPE tokenizer with an
``<image>`` token, a PIL-backend LLaVA processor (16x16 crops, 8-pixel patches: 4 image tokens per
image), a 2-layer CLIP vision tower and a Llama language model, randomly initialised and saved
with save_pretrained; and small PNG images."""

from __future__ import annotations

from pathlib import Path

from tiny import make_tokenizer

# ChatML over contents as parts (the way a VLM's processor template reads them).
VLM_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_TOKENS = 4  # (16 / 8)^2 patches; the CLS feature is dropped ("default" strategy)


def make_processor(path: Path, crop: int = 16):
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tok = make_tokenizer(path, extra_token="<image>")
    images = LlavaImageProcessorPil(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop})
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8, num_additional_image_tokens=1,
                               vision_feature_select_strategy="default", image_token="<image>",
                               chat_template=VLM_CHATML)
    processor.save_pretrained(path)
    return processor


def make_vlm(path: Path, processor, layers: int = 4, hidden: int = 32, seed: int = 0):
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    tok = processor.tokenizer
    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       tie_word_embeddings=False)
    tower = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                             image_size=16, patch_size=8, projection_dim=16)
    cfg = LlavaConfig(vision_config=tower, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=IMAGE_TOKENS)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model


def write_png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (20, 16)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    img.putpixel((0, 0), (255 - color[0], 255 - color[1], 255 - color[2]))  # not a flat image
    img.save(path, format="PNG")
    return path
