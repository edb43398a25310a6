"""Bad inputs get clear errors that name the file, line or key; prompt sources; config handling."""

import json
import re

import pytest
import torch
import yaml
from conftest import tiny_config
from tiny import make_model, make_tokenizer

from distillm2 import cli
from distillm2.config import ConfigError, RunConfig, load_config
from distillm2.data import demo_prompts, load_prompts, prompt_id
from distillm2.errors import DataError, TokenizerMismatch
from distillm2.files import read_jsonl
from distillm2.models import derive_student, evenly_spaced_layers, load_model


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:3: not valid JSON"):
        load_prompts(str(path))
    path.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: expected a JSON object"):
        read_jsonl(path)


def test_missing_field_and_empty_prompt(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "a"}\n{"q": "b"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: missing field 'question' \(row has keys: q\)"):
        load_prompts(str(path))
    path.write_text('{"foo": "a"}\n')
    with pytest.raises(DataError, match="no prompt field found; set data.field"):
        load_prompts(str(path))
    path.write_text('{"prompt": "fine"}\n{"prompt": "   "}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: empty prompt"):
        load_prompts(str(path))
    path.write_text('{"messages": [{"role": "user", "content": ""}]}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:1: empty prompt"):
        load_prompts(str(path))


def test_prompt_sources_and_stable_ids(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "hello"}]}, {"messages": [{"role": "user", "content": "bye"}]}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    records = load_prompts(str(tmp_path / "a.json"))
    assert len(records) == 2  # the trailing assistant turn is dropped, the duplicate kept once
    assert records[0]["id"] == prompt_id("hello") == prompt_id([{"role": "user", "content": "hello"}])
    import pandas as pd

    pd.DataFrame({"instruction": ["x one", "y two"]}).to_csv(tmp_path / "b.csv", index=False)
    pd.DataFrame({"instruction": ["x one", "y two"]}).to_parquet(tmp_path / "b.parquet")
    assert load_prompts(str(tmp_path / "b.csv")) == load_prompts(str(tmp_path / "b.parquet"))
    with pytest.raises(DataError, match="prompt file not found"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_demo_prompt_set():
    train, held = demo_prompts("train"), demo_prompts("heldout")
    assert len(train) >= 600 and len(held) >= 100
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    assert len({r["kind"] for r in train}) >= 8
    assert demo_prompts("train") == train  # deterministic
    assert load_prompts("demo:heldout")[0]["id"] == held[0]["id"]


def test_unknown_config_key_lists_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"lrr": 1e-4}}))
    with pytest.raises(ConfigError, match=r"unknown key train\.lrr; valid keys in train: optimizer, lr, weight_decay"):
        load_config(RunConfig, path)
    path.write_text(yaml.safe_dump({"roundz": 2}))
    with pytest.raises(ConfigError, match="valid keys: output_dir, rounds"):
        load_config(RunConfig, path)
    with pytest.raises(ConfigError, match="train.lr: expected float"):
        load_config(RunConfig, overrides=["train.lr=fast"])
    with pytest.raises(ConfigError, match="loss.name: unknown loss 'kl'; valid: sft"):
        load_config(RunConfig, overrides=["loss.name=kl"])
    cfg = load_config(RunConfig, overrides=["train.lr=3e-4", "rounds=5", "models.student_layers=[0, 2]"])
    assert cfg.train.lr == 3e-4 and cfg.rounds == 5 and cfg.models.student_layers == [0, 2]


def test_cli_reports_config_errors_with_exit_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  nope: 1\n")
    assert cli.main(["run", str(path)]) == 2
    assert "unknown key train.nope" in capsys.readouterr().err


def test_tokenizer_mismatch_fails_before_any_work(tiny, tmp_path):
    other_tok = make_tokenizer(tmp_path / "other_tok", vocab_size=100, extra_token="<|extra|>")
    make_model(tmp_path / "other", other_tok, layers=2)
    cfg = load_config(RunConfig, base=tiny_config(tiny, tmp_path / "run", **{"models.student": str(tmp_path / "other")}))
    from distillm2.pipeline import run

    with pytest.raises(TokenizerMismatch, match="tokenizers differ"):
        run(cfg)
    assert not (tmp_path / "run" / "round-1").exists()


def test_head_wider_than_tokenizer_is_sliced(tiny, tmp_path):
    from distillm2.models import check_tokenizers, load_tokenizer

    tok = load_tokenizer(str(tiny / "tok"))
    wide = make_model(tmp_path / "wide", tok, layers=2, head_pad=7)
    narrow = load_model(str(tiny / "student"))
    assert check_tokenizers(tok, tok, wide, narrow) == len(tok)


def test_derived_student_copies_chosen_layers(tiny):
    teacher = load_model(str(tiny / "teacher"))
    assert evenly_spaced_layers(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    student = derive_student(teacher, layers=[1, 3])
    assert student.config.num_hidden_layers == 2
    t, s = teacher.state_dict(), student.state_dict()
    for key in s:
        m = re.match(r"(.*layers\.)(\d+)(\..*)", key)
        src = f"{m.group(1)}{ {'0': '1', '1': '3'}[m.group(2)]}{m.group(3)}" if m else key
        assert torch.equal(s[key], t[src]), key
    with pytest.raises(ValueError, match="increasing"):
        derive_student(teacher, layers=[2, 1])
