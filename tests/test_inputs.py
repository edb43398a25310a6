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


@pytest.mark.parametrize(("override", "message"), [
    ("train.lr=-1e-4", "train.lr: must be in [0, inf), got -0.0001"),
    ("loss.alpha0=1.5", "loss.alpha0: must be in [0, 1), got 1.5"),
    ("generation.max_new_tokens=-5", "generation.max_new_tokens: must be in [1, inf), got -5"),
    ("generation.temperature=0", "generation.temperature: sampling needs a temperature > 0"),
    ("generation.top_p=1.5", "generation.top_p: must be in (0, 1], got 1.5"),
    ("data.max_prompts=0", "data.max_prompts: must be in [1, inf), got 0"),
    ("models.student_layers=[0, -1]", "models.student_layers: must be in [0, inf), got -1"),
    ("loss.alpha_min=0.5", "loss.alpha_min (0.5) must not exceed loss.alpha_max (0.1)"),
])
def test_numbers_out_of_range_are_refused_when_the_config_is_read(override, message):
    """Issue 19, item 5: one line naming the key, the interval and the value, at load time --
    before any model is loaded or any file written (the run, check and compare all load here)."""
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, overrides=[override])
    assert message in str(err.value)
    assert load_config(RunConfig, overrides=["generation.temperature=0", "generation.greedy=true"])


def test_run_and_check_refuse_what_trains_nothing_or_a_layer_past_the_teacher(tiny, tmp_path, capsys):
    """Issue 19, items 4 and 5: ``rounds: 0`` without an SFT warm-up or alignment would save the
    untrained student as final/; a kept layer past the teacher's depth. Both exit 2 with one
    line from ``run`` and from ``check`` (which printed "fits" before), and write nothing."""
    cases = {"rounds": ({"rounds": 0}, "rounds: 0 with sft_epochs 0"),
             "layers": ({"models": {"teacher": str(tiny / "teacher"), "student_layers": [0, 9]}},
                        "models.student_layers: expected increasing indices in [0, 4)")}
    for name, (change, message) in cases.items():
        cfg = tiny_config(tiny, tmp_path / f"out-{name}")
        for key, value in change.items():
            cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        for command in ("run", "check"):
            capsys.readouterr()
            assert cli.main([command, str(path)]) == 2, (name, command)
            err = capsys.readouterr().err
            assert message in err and len([ln for ln in err.splitlines() if ln.strip()]) == 1, (name, command, err)
        assert not (tmp_path / f"out-{name}").exists()
    sft_only = tiny_config(tiny, tmp_path / "out-sft", rounds=0, sft_epochs=1.0)
    assert load_config(RunConfig, base=sft_only).rounds == 0  # SFT-only is a run that trains


def test_generate_refuses_an_output_made_with_other_settings(tiny, tmp_path, capsys):
    """Issue 19, item 1: rows made with other decoding settings (or another model) are never
    returned as this command's: exit 2 naming what differs; --force replaces them; the same
    command again continues (here: nothing left to do)."""
    out = tmp_path / "out.jsonl"
    base = ["generate", "--model", str(tiny / "teacher"), "--prompts", str(tiny / "prompts.jsonl"),
            "--output", str(out), "--limit", "4", "--max-new-tokens", "4"]
    assert cli.main(base) == 0
    first = out.read_text()
    assert cli.main(base) == 0 and out.read_text() == first  # same settings: continued, unchanged
    capsys.readouterr()
    assert cli.main([*base, "--temperature", "1.0"]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "precision:" not in ln]  # the probe's info line may precede
    assert "temperature: 0.8 -> 1.0" in err and "--force" in err and len(errors) == 1, err
    assert out.read_text() == first
    other = tmp_path / "other-model"
    make_model(other, make_tokenizer(tmp_path / "tok2"), layers=2, seed=3)
    assert cli.main([*base[:2], str(other), *base[3:]]) == 2  # another model, same settings
    assert "model" in capsys.readouterr().err
    assert cli.main([*base, "--temperature", "1.0", "--force"]) == 0
    assert json.loads((tmp_path / "out.jsonl.settings.json").read_text())["temperature"] == 1.0
    assert len(read_jsonl(out)) == 4


def test_non_utf8_prompts_and_a_directory_that_is_no_model_name_the_file(tmp_path):
    """Issue 19, item 6: a prompt file with non-UTF-8 bytes names the file and line; a folder
    without model or tokenizer files is named as such (not a traceback from a tokenizer backend)."""
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8 text"):
        load_prompts(str(bad))
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("hello")
    from distillm2.models import load_tokenizer

    with pytest.raises(DataError, match="not a model directory"):
        load_tokenizer(str(tmp_path / "not-a-model"))


def test_set_errors_name_the_set_and_trackers_need_their_package(tiny, tmp_path, monkeypatch):
    """Issue 19, item 7: a bad ``--set`` value is blamed on ``--set``, not on the YAML file; a
    tracker given as a string (as TRL and transformers take it) is one tracker; a tracker whose
    package is missing is an error naming the install command, before any work."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 1e-4}}))
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path, overrides=["train.lr=-1"])
    assert str(err.value).startswith("--set train.lr: must be in [0, inf)")
    path.write_text(yaml.safe_dump({"train": {"lr": -1}}))
    with pytest.raises(ConfigError, match=r"c.yaml: train.lr"):
        load_config(RunConfig, path)
    assert load_config(RunConfig, overrides=["train.report_to=tensorboard"]).train.report_to == ["tensorboard"]
    from distillm2 import distributed
    from distillm2.errors import MissingExtra

    # a package no machine has stands for mlflow's, so the test holds where mlflow is installed
    monkeypatch.setitem(distributed.TRACKER_PACKAGES, "mlflow", "mlflow_absent_for_this_test")
    with pytest.raises(MissingExtra, match="pip install mlflow_absent_for_this_test"):
        distributed.make_accelerator("no", ["mlflow"], tmp_path / "logs")
