"""Fitting the ecosystem: experiment trackers, `distillm2 plot`, the model card and a Hub push
(through a stand-in Hub client), data through `datasets`, pairs in TRL's and the released code's
layouts, from_pretrained arguments (a CPU quantisation), and a walk through bad inputs that
must each give one line, exit 2, and leave nothing half-written."""

import errno
import json
import os

import pytest
import yaml
from conftest import tiny_config
from tiny import make_model, make_tokenizer

from distillm2 import cli, files
from distillm2.config import RunConfig, load_config
from distillm2.data import load_prompts
from distillm2.hub import _loss, hub_id, model_card, push
from distillm2.pairs import load_pairs, write_pairs
from distillm2.pipeline import run


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("eco") / "run"
    cfg = load_config(RunConfig, base=tiny_config(tiny, out, sft_epochs=1.0, **{"train.report_to": ["tensorboard"]}))
    run(cfg)
    return out


def test_tensorboard_gets_every_metric_and_metrics_jsonl_stays(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [p for p in (finished_run / "logs").rglob("events.out.tfevents*")]
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    metrics = [json.loads(x) for x in (finished_run / "round-2" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "skl", "srkl", "beta", "lr", "grad_norm", "tokens_per_s"):
        assert f"round-2/{key}" in tags and key in metrics[0], key
    logged = [e.value for e in acc.Scalars("round-2/loss")]
    assert logged == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert "sft/nll" in tags


def test_plot_command(finished_run, tmp_path, capsys):
    assert cli.main(["plot", str(finished_run)]) == 0
    png = finished_run / "curves.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    new_folder = tmp_path / "plots" / "new"  # issue 19, item 10: --output into a folder that does not exist
    assert cli.main(["plot", str(finished_run), "--output", str(new_folder / "c.png")]) == 0
    assert (new_folder / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


class FakeHub:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, folder_path, repo_id, **kw):
        self.calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path)), kw))


def test_model_card_and_push(finished_run):
    card = model_card(finished_run)
    for needed in ("| teacher |", "| loss | distillm2", "| rounds | 2", "@inproceedings{ko2025distillm2",
                   "## Config", "warm-up | 1.0 epochs on teacher responses"):
        assert needed in card, needed
    # issue 19, item 10: a local path is never written as base_model (the Hub needs an id); the
    # curriculum is said to act from round 2; a constant beta is one number
    assert "base_model:" not in card.split("## Config")[0]
    assert "then adaptive in [" in card and "beta 0.5;" not in card and "->" not in card.split("| loss |")[1].split("\n")[0]
    assert hub_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("org/model") == "org/model" and hub_id(str(finished_run)) is None
    assert "not used in a 1-round run" in _loss({"name": "distillm2", "alpha0": 0.1, "curriculum": True}, 1)
    assert _loss({"name": "distillm2", "alpha0": 0.1, "beta_schedule": "linear", "beta0": 0.5, "beta_max": 0.75},
                 2).endswith("beta linear 0.5 -> 0.75")
    hub = FakeHub()
    url = push(finished_run, "me/tiny-student", private=True, api=hub)
    assert url.endswith("me/tiny-student")
    (create, repo, kw), (upload, repo2, names, _) = hub.calls
    assert (create, repo, kw["private"], upload, repo2) == ("create_repo", "me/tiny-student", True, "upload_folder",
                                                            "me/tiny-student")
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    with pytest.raises(Exception, match="expected 'user/name'"):
        push(finished_run, "nouser", api=FakeHub())


def test_datasets_builders_column_mapping_and_streaming(tmp_path):
    rows = [{"question": f"what is {i} plus {i}?", "label": str(2 * i)} for i in range(5)]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    hf = {"data_files": [str(path)], "split": "train"}
    loaded = load_prompts("hf:json", columns={"question": "prompt"}, response_field="label", hf=hf)
    assert [r["messages"][0]["content"] for r in loaded] == [r["question"] for r in rows]
    assert [r["response"] for r in loaded] == [r["label"] for r in rows]
    streamed = load_prompts("hf:json", field="question", limit=2, hf=dict(hf, streaming=True))
    assert len(streamed) == 2
    assert load_prompts(str(path), columns={"question": "prompt"}) == [{"id": r["id"], "messages": r["messages"]}
                                                                         for r in loaded]


def test_pairs_in_every_layout(tmp_path):
    standard = {"prompt": "list fruits", "chosen": "apples", "rejected": "rocks"}
    conversational = {"prompt": [{"role": "user", "content": "list fruits"}],
                      "chosen": [{"role": "assistant", "content": "apples"}],
                      "rejected": [{"role": "assistant", "content": "rocks"}]}
    released = {"prompt": "list fruits",
                "chosen": [{"role": "user", "content": "list fruits"}, {"role": "assistant", "content": "apples"}],
                "rejected": [{"role": "user", "content": "list fruits"}, {"role": "assistant", "content": "rocks"}]}
    loaded = []
    for name, row in (("standard", standard), ("conversational", conversational), ("released", released)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        loaded.append(load_pairs(path)[0])
    assert loaded[0] == loaded[1] == loaded[2]
    assert loaded[0]["prompt"] == [{"role": "user", "content": "list fruits"}] and loaded[0]["chosen"] == "apples"
    # written in TRL's conversational layout, and read back unchanged
    write_pairs(tmp_path / "out.jsonl", loaded[:1])
    written = json.loads((tmp_path / "out.jsonl").read_text())
    assert written["chosen"] == [{"role": "assistant", "content": "apples"}] and isinstance(written["prompt"], list)
    assert load_pairs(tmp_path / "out.jsonl") == loaded[:1]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "chosen": [{"role": "user", "content": "y"}],
                                                    "rejected": "z"}) + "\n")
    with pytest.raises(Exception, match=r"bad\.jsonl:1: chosen must end with an assistant message"):
        load_pairs(tmp_path / "bad.jsonl")


def test_teacher_loaded_with_a_cpu_quantisation(tiny, tmp_path):
    pytest.importorskip("torchao")
    tok = make_tokenizer(tmp_path / "tok")
    make_model(tmp_path / "teacher", tok, layers=2, hidden=64)
    quant = {"quant_method": "torchao", "quant_type": "Int8WeightOnlyConfig"}
    cfg = load_config(RunConfig, base=tiny_config(tiny, tmp_path / "q", rounds=1, **{
        "models.teacher": str(tmp_path / "teacher"), "models.teacher_dtype": "bfloat16",
        "models.teacher_kwargs": {"quantization_config": quant}}))
    out = run(cfg)
    assert (out / "final" / "model.safetensors").exists()
    from distillm2 import models

    teacher = models.load_model(str(tmp_path / "teacher"), "bfloat16", quantization_config=quant)
    assert type(teacher.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"


def _bad_inputs(tiny, tmp_path):
    """(name, argv, expected message) for bad inputs a user makes."""
    good = tiny_config(tiny, tmp_path / "never", rounds=1)

    def config(name, **changes):
        cfg = json.loads(json.dumps(good))
        cfg["output_dir"] = str(tmp_path / f"out-{name}")
        for key, value in changes.items():
            node = cfg
            *parents, last = key.split(".")
            for p in parents:
                node = node[p]
            node[last] = value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"prompt": "a"}\n{"prompt": \n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    other_tok = make_tokenizer(tmp_path / "other_tok", vocab_size=100, extra_token="<|x|>")
    make_model(tmp_path / "other", other_tok, layers=2)
    return [
        ("missing config", ["run", str(tmp_path / "nope.yaml")], "config file not found"),
        ("unknown key", ["run", config("unknown", **{"train.lrr": 1})], "unknown key train.lrr"),
        ("wrong list type", ["run", config("listtype", **{"models.student_layers": [0, "x"]})],
         "models.student_layers[1]: expected int"),
        ("missing prompts", ["run", config("noprompts", **{"data.prompts": str(tmp_path / "none.jsonl")})],
         "prompt file not found"),
        ("malformed prompts", ["run", config("malformed", **{"data.prompts": str(malformed)})], "malformed.jsonl:2"),
        ("empty prompts", ["run", config("empty", **{"data.prompts": str(empty)})], "no rows"),
        ("missing model", ["run", config("nomodel", **{"models.teacher": str(tmp_path / "no-model")})],
         "model not found"),
        ("offline hub", ["run", config("hub", **{"data.prompts": "hf:some/dataset"})], "cannot load the dataset"),
        ("tokenizer mismatch", ["run", config("mismatch", **{"models.student": str(tmp_path / "other")})],
         "tokenizers differ"),
        ("missing extra", ["generate", "--model", str(tiny / "teacher"), "--prompts", str(tiny / "prompts.jsonl"),
                           "--output", str(tmp_path / "g.jsonl"), "--backend", "vllm"], "pip install 'distillm2[vllm]'"),
    ]


def test_bad_inputs_give_one_line_and_write_nothing(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cases = _bad_inputs(tiny, tmp_path)
    capsys.readouterr()
    for name, argv, expected in cases:
        if name == "missing extra" and __import__("importlib").util.find_spec("vllm"):
            continue
        assert cli.main(argv) == 2, name
        err = capsys.readouterr().err
        assert expected in err, (name, err)
        # transformers' own progress bars may come first; ours is one line
        lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln]
        assert "Traceback" not in err and len(lines) == 1, (name, err)
        assert not (tmp_path / f"out-{name.split()[0]}").exists() or name == "unknown key"
    assert not any(p.name.startswith("out-") for p in tmp_path.iterdir()), "a bad input wrote a run directory"


def test_a_changed_config_is_refused_unless_forced(tiny, tmp_path, capsys):
    cfg = tiny_config(tiny, tmp_path / "run", rounds=1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["run", str(path)]) == 0
    capsys.readouterr()
    assert cli.main(["run", str(path), "--set", "train.lr=0.5"]) == 2
    assert "train.lr: 0.001 -> 0.5" in capsys.readouterr().err
    assert cli.main(["run", str(path), "--set", "eval.max_prompts=3"]) == 0  # evaluation settings change nothing
    assert cli.main(["run", str(path), "--set", "train.lr=0.5", "--force"]) == 0


def test_disk_full_loses_nothing(tiny, tmp_path, monkeypatch, capsys):
    target = tmp_path / "rows.jsonl"
    files.write_jsonl(target, [{"id": "a"}])
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        files.write_jsonl(target, [{"id": "a"}, {"id": "b"}])
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert target.read_text() == '{"id": "a"}\n'  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]  # no temporary left behind
    monkeypatch.setattr(os, "fsync", full)
    assert cli.main(["generate", "--model", str(tiny / "teacher"), "--prompts", str(tiny / "prompts.jsonl"),
                     "--output", str(tmp_path / "o.jsonl"), "--limit", "2", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "no space left on the device" in err and "rerun the same command" in err
