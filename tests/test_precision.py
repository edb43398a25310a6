"""``auto`` precision: the rule, the per-machine probe and its cache, the run record that a resumed
run keeps, the warning for an explicit bf16 that runs slowly, and YAML's boolean words."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config

from distillm2 import precision
from distillm2.config import RunConfig, load_config
from distillm2.errors import ConfigError


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLM2_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_probe(monkeypatch, f32, bf16):
    calls = []

    def probe(k, n, seconds=precision.PROBE_SECONDS):
        calls.append((k, n))
        return {"shape": [precision.PROBE_ROWS, k, n], "threads": 1, "float32_gflops": f32, "bfloat16_gflops": bf16}

    monkeypatch.setattr(precision, "gemm_probe", probe)
    return calls


@pytest.mark.parametrize(("f32", "bf16", "weights", "autocast"), [
    (47.0, 1.1, "float32", "no"),  # AVX2 only: bf16 falls to a scalar loop
    (250.0, 800.0, "bfloat16", "bf16"),  # AMX
    (100.0, 110.0, "float32", "no"),  # bf16 barely faster: not worth autocast's casts
])
def test_cpu_rule_and_cache(fresh_cache, monkeypatch, f32, bf16, weights, autocast):
    calls = fake_probe(monkeypatch, f32, bf16)
    found = precision.verdict("cpu", 576, 1536)
    assert (found.weights, found.autocast) == (weights, autocast)
    assert f"float32 {f32:.1f}, bfloat16 {bf16:.1f} GFLOP/s" in found.reason
    precision.verdict("cpu", 576, 1536)
    assert calls == [(576, 1536)]  # measured once per machine and shape, then read from the cache
    table = json.loads((fresh_cache / "precision.json").read_text())
    assert [v["bfloat16_gflops"] for v in table.values()] == [bf16]
    precision.verdict("cpu", 4096, 11008)  # other shapes: their own probe, capped in size
    assert calls[-1] == (4096, 11008)
    assert list(table)[0] != precision.machine_key(4096, 11008)


def test_resolve_each_kind():
    found = precision.Verdict("cpu", "float32", "avx2")
    assert precision.resolve("auto", "master", found) == "float32"
    assert precision.resolve("auto", "weights", found) == "float32"
    assert precision.resolve("auto", "autocast", found) == "no"
    assert precision.resolve("bfloat16", "weights", found) == "bfloat16"  # explicit values win
    gpu = precision.Verdict("cuda", "float16", "T4")
    assert precision.resolve("auto", "autocast", gpu) == "fp16"
    assert precision.resolve("auto", "master", gpu) == "float32"  # master weights stay float32 under fp16


@pytest.mark.parametrize(("capability", "weights", "autocast"), [((7, 5), "float16", "fp16"),
                                                                 ((8, 0), "bfloat16", "bf16")])
def test_cuda_rule_by_compute_capability(monkeypatch, capability, weights, autocast):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    found = precision.verdict("cuda:0")
    assert (found.weights, found.autocast) == (weights, autocast)
    assert f"compute capability {capability[0]}.{capability[1]}" in found.reason


def test_explicit_bf16_where_slow_warns_with_the_numbers(fresh_cache, monkeypatch, caplog):
    fake_probe(monkeypatch, 47.0, 1.1)
    with caplog.at_level("WARNING", logger="distillm2"):
        assert precision.resolve_weights("bfloat16", "cpu", None, "generation.dtype") == "bfloat16"
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and "generation.dtype" in warning[0] and "bfloat16 1.1 GFLOP/s" in warning[0]
    caplog.clear()
    fake_probe(monkeypatch, 250.0, 800.0)
    (fresh_cache / "precision.json").unlink()
    with caplog.at_level("WARNING", logger="distillm2"):
        precision.resolve_weights("bfloat16", "cpu", None, "generation.dtype")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_run_records_its_choice_and_a_resumed_run_keeps_it(tiny, tmp_path, fresh_cache, monkeypatch):
    from distillm2.pipeline import Run

    fake_probe(monkeypatch, 47.0, 1.1)
    data = tiny_config(tiny, tmp_path / "run", rounds=1)
    for key in ("dtype", "teacher_dtype"):
        data["models"].pop(key)
    data["generation"].pop("dtype")
    data["train"].pop("mixed_precision")
    cfg = load_config(RunConfig, base=data)
    assert (cfg.models.teacher_dtype, cfg.train.mixed_precision) == ("auto", "auto")
    run = Run(cfg)
    assert (run.cfg.models.teacher_dtype, run.cfg.generation.dtype, run.cfg.train.mixed_precision,
            run.cfg.models.dtype) == ("float32", "float32", "no", "float32")
    assert run.acc.mixed_precision == "no"
    assert next(run.teacher.parameters()).dtype == torch.float32
    record = json.loads((tmp_path / "run" / "precision.json").read_text())
    assert record["chosen"]["train.mixed_precision"] == "no" and record["numbers"]["bfloat16_gflops"] == 1.1
    assert "auto" in (tmp_path / "run" / "config.yaml").read_text()  # the config as given
    # The machine now says bf16: the resumed run keeps what it started with, and is not refused.
    (fresh_cache / "precision.json").unlink()
    fake_probe(monkeypatch, 250.0, 800.0)
    again = Run(cfg)
    assert again.cfg.train.mixed_precision == "no" and again.cfg.models.teacher_dtype == "float32"
    # A new run on that machine chooses bf16.
    fresh = Run(load_config(RunConfig, base={**data, "output_dir": str(tmp_path / "run2")}))
    assert fresh.cfg.train.mixed_precision == "bf16" and fresh.acc.mixed_precision == "bf16"
    assert next(fresh.teacher.parameters()).dtype == torch.bfloat16


def test_saved_explicit_value_equal_to_auto_is_no_change(tiny, tmp_path, fresh_cache, monkeypatch):
    """A run made when the defaults were explicit continues under ``auto`` where auto resolves to
    the same values, and is refused where it does not."""
    from distillm2.pipeline import Run

    fake_probe(monkeypatch, 47.0, 1.1)
    data = tiny_config(tiny, tmp_path / "run", rounds=1)  # explicit float32 / no
    Run(load_config(RunConfig, base=data))
    for key in ("dtype", "teacher_dtype"):
        data["models"][key] = "auto"
    data["generation"]["dtype"] = "auto"
    data["train"]["mixed_precision"] = "auto"
    Run(load_config(RunConfig, base=data))  # auto resolves to float32 / no here: the same run
    data["models"]["teacher_dtype"] = "bfloat16"
    with pytest.raises(ConfigError, match="models.teacher_dtype"):
        Run(load_config(RunConfig, base=data))


def test_auto_agrees_with_a_fresh_probe(fresh_cache):
    """On whatever CPU runs the suite: the cached choice is the one a fresh probe gives (unless
    the two dtypes are too close to call)."""
    found = precision.verdict("cpu", 576, 1536)
    fresh = precision.gemm_probe(576, 1536)
    ratio = fresh["bfloat16_gflops"] / fresh["float32_gflops"]
    if 0.8 * precision.CPU_BF16_MARGIN < ratio < 1.25 * precision.CPU_BF16_MARGIN:
        pytest.skip(f"bf16/float32 = {ratio:.2f} on this CPU: too close to the margin to compare two timings")
    assert found.weights == ("bfloat16" if ratio >= precision.CPU_BF16_MARGIN else "float32")


def test_forced_avx2_chooses_float32(tmp_path):
    """ATEN_CPU_CAPABILITY=avx2 with ONEDNN_MAX_CPU_ISA=AVX2 makes a CPU with bf16 units behave as
    an AVX2-only one (docs/design.md): auto then keeps float32, and the probe agrees."""
    code = ("import json, torch; from distillm2 import precision; v = precision.verdict('cpu', 576, 1536); "
            "print(json.dumps({'isa': torch.backends.cpu.get_cpu_capability(), 'weights': v.weights, "
            "'numbers': v.numbers}))")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", DISTILLM2_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["isa"] == "AVX2"
    assert result["numbers"]["bfloat16_gflops"] < result["numbers"]["float32_gflops"]
    assert result["weights"] == "float32"


def test_yaml_boolean_words_read_as_the_choice(tmp_path):
    cfg = load_config(RunConfig, overrides=["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(RunConfig, path).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="quote the word"):  # a free string field: the hint says why
        load_config(RunConfig, overrides=["data.field=no"])
    with pytest.raises(ConfigError, match="train.mixed_precision: expected str, got True"):  # yes is no choice
        load_config(RunConfig, overrides=["train.mixed_precision=yes"])
