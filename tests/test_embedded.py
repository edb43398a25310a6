"""The real embedded teacher (slow: converts the GGUF once, ~25 s, then loads in a second)."""

import pytest
import torch

from distillm2 import models
from distillm2.data import collate, encode
from distillm2.losses import distillm2_loss

pytestmark = pytest.mark.slow


def test_embedded_teacher_derive_generate_and_one_distillation_step():
    tok = models.load_tokenizer("smollm2-135m-instruct")
    teacher = models.load_model("smollm2-135m-instruct", "float32")
    assert teacher.config.num_hidden_layers == 30 and len(tok) == 49152
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    student = models.derive_student(teacher, num_layers=4)
    assert student.config.num_hidden_layers == 4
    assert models.check_tokenizers(tok, tok, teacher, student) == 49152

    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = teacher.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chosen = encode(tok, messages, answer, False, 128, 160)
    rejected = encode(tok, messages, "I do not know.", True, 128, 160)
    batch = collate([chosen, rejected], tok.pad_token_id)
    args = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, logits_to_keep=batch.keep)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    before = student.model.layers[0].mlp.up_proj.weight.detach().clone()
    s = student(**args).logits
    with torch.no_grad():
        t = teacher(**args).logits
    loss = distillm2_loss(s[:1], t[:1], batch.mask[:1], s[1:], t[1:], batch.mask[1:]).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and loss > 0
    assert not torch.equal(before, student.model.layers[0].mlp.up_proj.weight)
