"""Vision-language prompts and models on a tiny random LLaVA: image parts, ids that follow the
image bytes, clear errors, collation with pixels, the response-logit slice, generation and a
one-round run, and the paths that refuse images."""

import base64
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config
from tiny_vision import IMAGE_TOKENS, make_processor, make_vlm, write_png

from distillm2 import models, vision
from distillm2.config import GenerationConfig, LossConfig, RunConfig, TrainConfig, load_config
from distillm2.data import (
    collate,
    encode,
    load_prompts,
    prompt_id,
    prompt_inputs,
    prompt_token_ids,
    to_messages,
)
from distillm2.distributed import make_accelerator
from distillm2.errors import ConfigError, DataError, TokenizerMismatch
from distillm2.generation import generate_responses
from distillm2.losses import LOSSES
from distillm2.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: a second intra-op thread only adds synchronisation, which costs
    several times the work on a 2-core machine that is busy with anything else."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def vlm(tmp_path_factory):
    """A tiny LLaVA teacher (4 language layers) with its processor, PNG images and a prompt file
    whose image paths are relative to it."""
    root = tmp_path_factory.mktemp("vlm")
    processor = make_processor(root / "teacher")
    make_vlm(root / "teacher", processor, layers=4)
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
    for i, color in enumerate(colors):
        write_png(root / "data" / "img" / f"{i}.png", color)
    words = ["apple", "river", "cloud", "stone", "green", "music"]
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "path": f"img/{i}.png"},
                                                        {"type": "text", "text": f"describe the {w}"}]}]}
            for i, w in enumerate(words)]
    rows.append({"messages": [{"role": "user", "content": "explain gravity in one sentence"}]})  # text rows mix in
    (root / "data" / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _user(*parts):
    return [{"role": "user", "content": list(parts)}]


def test_image_parts_parse_in_every_layout_and_ids_follow_the_bytes(vlm, tmp_path):
    png = vlm / "data" / "img" / "0.png"
    data = png.read_bytes()
    layouts = [{"type": "image", "path": "img/0.png"}, {"type": "image", "url": png.as_uri()},
               {"type": "image", "image": str(png)}, {"type": "image_url", "image_url": {"url": png.as_uri()}},
               {"type": "image", "url": "data:image/png;base64," + base64.b64encode(data).decode()}]
    ids = set()
    for part in layouts:
        messages = to_messages(_user(part, {"type": "text", "text": "what is it"}), "row", base=vlm / "data")
        stored = messages[0]["content"][0]
        assert stored["sha256"] == hashlib.sha256(data).hexdigest() and stored["type"] == "image"
        assert stored.get("path") == str(png) or stored.get("url", "").startswith("data:")
        ids.add(prompt_id(messages))
    assert len(ids) == 1  # the id hashes the bytes, not where they live
    # the same path with other bytes is another prompt
    same = tmp_path / "same.png"
    same.write_bytes(data)
    question = _user({"type": "image", "path": str(same)}, {"type": "text", "text": "what is it"})
    assert prompt_id(to_messages(question, "row")) in ids
    write_png(same, (1, 2, 3))
    assert prompt_id(to_messages(question, "row")) not in ids
    # text prompts keep the ids they had (the canonical JSON of role + string content)
    text = [{"role": "user", "content": "hello"}]
    old = hashlib.sha1(json.dumps(text, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert prompt_id(text) == old[:16]
    # a list of text parts only is a text prompt
    joined = to_messages(_user({"type": "text", "text": "a"}, {"type": "text", "text": "b"}), "row")
    assert joined == [{"role": "user", "content": "a\nb"}]
    records = load_prompts(str(vlm / "data" / "prompts.jsonl"))
    assert len(records) == 7 and sum(vision.has_images(r["messages"]) for r in records) == 6


def test_bad_images_give_errors_naming_file_row_and_what_was_expected(vlm, tmp_path):
    path = tmp_path / "p.jsonl"
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    ok = {"messages": _user({"type": "image", "path": str(vlm / "data" / "img" / "1.png")},
                            {"type": "text", "text": "ok"})}
    bad = {"messages": _user({"type": "image", "path": "nope/cat.png"}, {"type": "text", "text": "where"})}
    path.write_text(json.dumps(ok) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:2: message 0, part 0: image file not found: .*nope/cat\.png "
                                        r"\(expected an image file; relative paths resolve against the data file"):
        load_prompts(str(path))
    path.write_text(json.dumps({"messages": _user({"type": "image", "path": "junk.png"})}) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:1: .*junk\.png is not a readable image .*expected PNG, JPEG"):
        load_prompts(str(path))
    path.write_text(json.dumps({"messages": _user({"type": "image"}, {"type": "text", "text": "x"})}) + "\n")
    with pytest.raises(DataError, match="an image part needs exactly one string 'path' or 'url'"):
        load_prompts(str(path))
    with pytest.raises(DataError, match="data:image/<type>;base64"):
        to_messages(_user({"type": "image", "url": "data:text/plain,hello"}), "row")
    # an image that changes after its prompt was recorded is refused when it is loaded again
    img = write_png(tmp_path / "changing.png", (9, 9, 9))
    [record] = load_prompts(str(_write(tmp_path / "q.jsonl", _user({"type": "image", "path": "changing.png"}))))
    write_png(img, (10, 10, 10))
    with pytest.raises(DataError, match=r"changing\.png changed since the prompts were read"):
        vision.load_image(record["messages"][0]["content"][0])


def test_http_images_are_fetched_once_and_kept_by_their_hash(vlm, tmp_path, monkeypatch):
    """A loopback HTTP server (no network): the image is fetched when the prompts are read, later
    loads take the cached copy, and an unreachable URL is an error naming it."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    monkeypatch.setenv("DISTILLM2_CACHE", str(tmp_path / "cache"))
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(vlm / "data" / "img"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/2.png"
    try:
        [message] = to_messages(_user({"type": "image_url", "image_url": {"url": url}}), "row")
    finally:
        server.shutdown()
        server.server_close()
    part = message["content"][0]
    assert part["url"] == url and (tmp_path / "cache" / "images" / part["sha256"]).exists()
    assert vision.load_image(part).size == (20, 16)  # from the cache: the server is gone
    with pytest.raises(DataError, match=r"row: message 0, part 0: cannot fetch image http://127\.0\.0\.1"):
        to_messages(_user({"type": "image", "url": url}), "row")


def _write(path, messages):
    path.write_text(json.dumps({"messages": messages}) + "\n")
    return path


def test_collation_carries_pixels_and_the_response_logits_equal_a_direct_call(vlm):
    tok = models.load_tokenizer(str(vlm / "teacher"))
    assert vision.processor_of(tok) is not None
    model = models.load_model(str(vlm / "teacher")).eval()
    records = load_prompts(str(vlm / "data" / "prompts.jsonl"))
    image_prompt, text_prompt = records[0]["messages"], records[-1]["messages"]
    rows = [encode(tok, image_prompt, "paris is the capital", True, 96, 128),
            encode(tok, text_prompt, "one two", False, 96, 128)]
    image_id = model.config.image_token_id
    assert rows[0].prompt_ids.count(image_id) == IMAGE_TOKENS and rows[1].images is None
    batch = collate(rows, tok.pad_token_id)
    assert batch.images[1] is None and batch.images[0]["pixel_values"].shape == (1, 3, 16, 16)
    vocab = len(tok)
    with torch.no_grad():
        logits = models.response_logits(model, batch, vocab)
        for i, row in enumerate(rows):  # each row alone, unpadded, straight through the model
            ids = torch.tensor([row.prompt_ids + row.response_ids])
            extra = batch.images[i] or {}
            direct = model(input_ids=ids, **extra).logits[0, len(row.prompt_ids) - 1 : -1, :vocab]
            n = len(row.response_ids)
            torch.testing.assert_close(logits[i, :n], direct, rtol=1e-4, atol=1e-5)
        # the image is seen: other pixels, other logits on the response
        other = encode(tok, records[1]["messages"], "paris is the capital", True, 96, 128)
        swapped = collate([rows[0]], tok.pad_token_id)
        swapped.images = collate([other], tok.pad_token_id).images
        n0 = len(rows[0].response_ids)
        assert not torch.allclose(models.response_logits(model, swapped, vocab)[0, :n0], logits[0, :n0], atol=1e-4)
    # a text-only path refuses an image prompt instead of dropping the image
    with pytest.raises(DataError, match="takes text prompts only"):
        prompt_token_ids(tok, image_prompt)
    # an image prompt is never cut: a limit below its length is an error
    with pytest.raises(DataError, match="data.max_prompt_length=8"):
        prompt_inputs(tok, image_prompt, max_prompt_length=8)


def test_derived_student_keeps_language_layers_and_the_whole_vision_tower(vlm):
    teacher = models.load_model(str(vlm / "teacher"))
    student = models.derive_student(teacher, layers=[1, 3])
    assert student.config.text_config.num_hidden_layers == 2
    assert student.config.vision_config.num_hidden_layers == 2  # the tower is untouched
    t, s = teacher.state_dict(), student.state_dict()
    for key, value in s.items():
        src = key
        if key.startswith("model.language_model.layers."):
            index = int(key.split(".")[3])
            src = key.replace(f"layers.{index}.", f"layers.{[1, 3][index]}.", 1)
        assert torch.equal(value, t[src]), key
    assert any(k.startswith("model.vision_tower.") for k in s) and any("multi_modal_projector" in k for k in s)
    frozen = models.freeze_vision_tower(student)
    assert not any(p.requires_grad for p in frozen.model.vision_tower.parameters())
    assert all(p.requires_grad for p in frozen.model.multi_modal_projector.parameters())


def test_lora_keeps_out_of_a_frozen_tower_and_trains_through_pixels(vlm):
    tok = models.load_tokenizer(str(vlm / "teacher"))
    student = models.add_lora(models.load_model(str(vlm / "teacher")), r=2, alpha=4, frozen_vision=True)
    names = [n for n, _ in student.named_parameters() if "lora_" in n]
    assert names and not any("vision_tower" in n for n in names)
    assert any("multi_modal_projector" in n for n in names) and any("language_model" in n for n in names)
    records = load_prompts(str(vlm / "data" / "prompts.jsonl"))
    batch = collate([encode(tok, records[0]["messages"], "paris is", True, 96, 128)], tok.pad_token_id)
    models.response_logits(student, batch, len(tok)).float().logsumexp(-1).sum().backward()
    grads = [p.grad for n, p in student.named_parameters() if "lora_B" in n and "multi_modal_projector" in n]
    assert grads and all(g is not None for g in grads)  # the projector's adapters see the image


def test_memory_check_counts_a_vlm_with_its_frozen_tower(vlm, tmp_path):
    from distillm2.check import plan_run

    cfg = _run_cfg(vlm, tmp_path / "plan")
    plan = plan_run(cfg, 1, "ddp", 80.0)
    teacher = models.load_model(str(vlm / "teacher"))
    student = models.derive_student(teacher, num_layers=2)
    tower = sum(p.numel() for p in student.model.vision_tower.parameters())
    assert plan.params == {"teacher": sum(p.numel() for p in teacher.parameters()),
                           "student": sum(p.numel() for p in student.parameters()),
                           "trainable": sum(p.numel() for p in student.parameters()) - tower}
    assert not plan.unchecked, plan.unchecked


def test_processor_mismatch_is_refused(vlm, tmp_path):
    other = make_processor(tmp_path / "other", crop=24)  # other pixels and token counts
    make_vlm(tmp_path / "other", other, layers=2)
    teacher_tok = models.load_tokenizer(str(vlm / "teacher"))
    with pytest.raises(TokenizerMismatch, match="processors differ on an image prompt"):
        models.check_tokenizers(teacher_tok, models.load_tokenizer(str(tmp_path / "other")))


def _run_cfg(vlm, out, **overrides):
    base = tiny_config(vlm, out, **{"models.teacher": str(vlm / "teacher"), "data.prompts":
                                    str(vlm / "data" / "prompts.jsonl"), "rounds": 1, "train.grad_accum": 1,
                                    **overrides})
    return load_config(RunConfig, base=base)


def test_one_round_on_image_prompts_trains_the_student(vlm, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from distillm2 import run

    out = run(_run_cfg(vlm, tmp_path / "run", **{"eval.prompts": str(vlm / "data" / "prompts.jsonl"),
                                                  "eval.max_prompts": 3, "eval.max_new_tokens": 4}))
    for name in ("round-1/teacher.jsonl", "round-1/student.jsonl", "round-1/pairs.jsonl", "final/config.json"):
        assert (out / name).exists(), name
    for who in ("teacher", "student"):  # sampled with the images (hf backend)
        assert len((out / "round-1" / f"{who}.jsonl").read_text().splitlines()) == 7
    pairs = [json.loads(x) for x in (out / "round-1" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 7 and sum(vision.has_images(p["prompt"]) for p in pairs) == 6
    metrics = [json.loads(x) for x in (out / "round-1" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    init, final = load_file(str(out / "student-init" / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    changed = {k for k in final if not torch.equal(final[k], init[k])}  # (saved under LLaVA's legacy names)
    assert any("language_model" in k and ".layers." in k for k in changed)
    assert any("multi_modal_projector" in k for k in changed)
    assert not any("vision_tower" in k for k in changed)  # models.freeze_vision_tower
    # the held-out evaluation runs on image prompts too (greedy outputs, KL on the teacher's)
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["n_prompts"] == 3 and results["models"]["student"]["kl_teacher_responses"] >= 0
    # final/ is a whole VLM: it loads with its processor
    AutoProcessor.from_pretrained(out / "final")
    assert AutoModelForImageTextToText.from_pretrained(out / "final").config.text_config.num_hidden_layers == 2


@pytest.mark.parametrize("loss", [name for name in LOSSES if name != "skd"])
def test_every_loss_trains_on_image_pairs(vlm, tmp_path, loss):
    tok = models.load_tokenizer(str(vlm / "teacher"))
    teacher = models.load_model(str(vlm / "teacher"))
    student = models.freeze_vision_tower(models.derive_student(teacher, num_layers=2))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    prompts = load_prompts(str(vlm / "data" / "prompts.jsonl"))[:4]
    pairs = [{"id": p["id"], "prompt": p["messages"], "chosen": "paris is the capital", "rejected": f"one two {i}",
              "chosen_finished": True, "rejected_finished": i % 2 == 0} for i, p in enumerate(prompts)]
    cfg = TrainConfig(lr=1e-2, batch_size=2, mixed_precision="no", warmup_ratio=0.0, checkpoint_every=0)
    trainer = Trainer(accelerator=make_accelerator("no"), student=student, teacher=teacher, tokenizer=tok, pairs=pairs,
                      train_cfg=cfg, loss_cfg=LossConfig(name=loss), stage_dir=tmp_path / loss, vocab=len(tok),
                      max_prompt_length=96, max_length=128)
    trained = trainer.fit()
    metrics = [json.loads(x) for x in (tmp_path / loss / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    after = trained.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in after if "language_model" in k)
    assert all(torch.equal(after[k], before[k]) for k in after if "vision_tower" in k)


def test_train_command_reads_image_pairs_relative_to_the_pairs_file(vlm, tmp_path):
    from distillm2 import train_stage
    from distillm2.config import TrainStageConfig

    rows = [{"prompt": [{"role": "user", "content": [{"type": "image", "path": f"img/{i}.png"},
                                                      {"type": "text", "text": "what colour"}]}],
             "chosen": "apples bananas", "rejected": "one two"} for i in range(2)]
    pairs = vlm / "data" / "pairs-train.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(TrainStageConfig, base={
        "pairs": str(pairs), "output_dir": str(tmp_path / "train"),
        "models": {"teacher": str(vlm / "teacher"), "student_num_layers": 2, "teacher_dtype": "float32"},
        "data": {"max_prompt_length": 96, "max_length": 128},
        "train": {"batch_size": 2, "mixed_precision": "no", "lr": 1e-3}})
    final = train_stage(cfg)
    assert (final / "model.safetensors").exists() and (final / "processor_config.json").exists()


def test_paths_that_cannot_take_images_refuse_them(vlm, tmp_path, tiny):
    from distillm2 import run

    for key, value, match in (("generation.backend", "vllm", "generation.backend vllm cannot take image prompts"),
                              ("train.fused_loss", True, "train.fused_loss .* cannot take image prompts"),
                              ("train.teacher_topk", 4, "train.teacher_topk .* cannot take image prompts"),
                              ("loss.name", "skd", "loss skd .* cannot take image prompts")):
        with pytest.raises(ConfigError, match=match):
            run(_run_cfg(vlm, tmp_path / key, **{key: value}))
        assert not (tmp_path / key).exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="the teacher is not a vision-language model"):
        run(_run_cfg(vlm, tmp_path / "text", **{"models.teacher": str(tiny / "teacher")}))
    tok = models.load_tokenizer(str(vlm / "teacher"))
    prompts = load_prompts(str(vlm / "data" / "prompts.jsonl"))
    teacher = models.load_model(str(vlm / "teacher"))
    pairs = [{"id": "a", "prompt": prompts[0]["messages"], "chosen": "x", "rejected": "y"}]
    for key, value in (("fused_loss", True), ("teacher_topk", 4)):  # the Trainer refuses on its own too
        with pytest.raises(ConfigError, match=f"train.{key} .* cannot take image prompts"):
            Trainer(accelerator=make_accelerator("no"), student=teacher, teacher=teacher, tokenizer=tok, pairs=pairs,
                    train_cfg=TrainConfig(**{key: value}), loss_cfg=LossConfig(), stage_dir=tmp_path / key,
                    vocab=len(tok))
    for backend in ("vllm", "server"):
        with pytest.raises(ConfigError, match=f"generation.backend {backend} cannot take image prompts"):
            generate_responses(None, tok, prompts, tmp_path / f"{backend}.jsonl",
                               GenerationConfig(backend=backend, server_url="http://127.0.0.1:9/v1"), role="teacher")


def test_the_llava_recipe_loads():
    [path] = sorted((ROOT / "configs").glob("llava-*.yaml"))
    cfg = load_config(RunConfig, path)
    assert cfg.models.teacher.startswith("llava-hf/") and cfg.models.freeze_vision_tower
    assert cfg.generation.backend == "hf" and cfg.data.max_prompt_length > 576  # 576 image tokens + the text
    assert "GiB" in path.read_text() and yaml.safe_load(path.read_text())


def test_a_run_made_before_the_vision_key_continues(tmp_path):
    import dataclasses

    from distillm2.config import to_yaml
    from distillm2.pipeline import check_saved_config

    cfg = RunConfig(output_dir=str(tmp_path))
    saved = to_yaml(cfg)
    assert "  freeze_vision_tower: true\n" in saved
    (tmp_path / "config.yaml").write_text(saved.replace("  freeze_vision_tower: true\n", ""))
    check_saved_config(tmp_path, cfg, force=False)  # absent then: it behaved as the default
    other = dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, freeze_vision_tower=False))
    with pytest.raises(ConfigError, match="models.freeze_vision_tower"):
        check_saved_config(tmp_path, other, force=False)


def test_processors_with_per_token_inputs_are_refused_before_any_work(vlm, tmp_path, monkeypatch):
    """Qwen2-VL's processor returns mm_token_type_ids beside input_ids; collation does not lay
    such inputs out, so image prompts on such a model are refused (here: the tiny LLaVA's
    processor asked to return them too)."""
    from transformers import LlavaProcessor

    from distillm2 import run

    monkeypatch.setattr(LlavaProcessor, "return_mm_token_type_ids", True)
    with pytest.raises(ConfigError, match=r"per-token inputs \(mm_token_type_ids"):
        run(_run_cfg(vlm, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
