"""The public surface and the house rules: the Python API, `--version`, `python -m distillm2`,
`config show`, the README's Python example, and the structure rules of the code (no file over
500 lines, no import cycle, no package import hidden in a function, nothing pointing outside the
repository)."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import distillm2
from distillm2 import cli, config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "distillm2"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def test_public_api_names():
    for name in ("run", "train", "generate", "evaluate", "compare", "load_config", "RunConfig", "GenerateConfig",
                 "EvaluateConfig", "CompareConfig", "TrainStageConfig", "distillm2_loss", "distillation_loss",
                 "skew_forward_kl", "skew_reverse_kl", "LOSSES", "__version__"):
        assert hasattr(distillm2, name), name
    assert callable(distillm2.run) and callable(distillm2.generate) and callable(distillm2.compare)


def test_version_and_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "distillm2", "--version"], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0 and out.stdout.strip() == f"distillm2 {distillm2.__version__}"
    helped = subprocess.run([sys.executable, "-m", "distillm2", "--help"], capture_output=True, text=True, env=ENV)
    assert helped.returncode == 0
    for command in ("demo", "run", "train", "generate", "eval", "compare", "config"):
        assert command in helped.stdout


def test_config_show_lists_every_key_with_default_and_help(capsys):
    assert cli.main(["config", "show", "run"]) == 0
    shown = capsys.readouterr().out
    # valid YAML whose values are the defaults
    assert yaml.safe_load(shown) == config.to_dict(config.RunConfig())
    assert "lr: 5.0e-05  # peak learning rate" in shown
    assert "name: distillm2  # the loss [sft | seqkd | kd" in shown
    for line in shown.splitlines():
        assert "  # " in line and line.split("  # ", 1)[1].strip(), f"no help: {line}"
    assert cli.main(["config", "show", "eval"]) == 0
    assert "tasks: [rouge]" in capsys.readouterr().out


def test_every_command_takes_yaml_flags_and_set(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "prompts": "p.jsonl", "output": "o.jsonl",
                                    "generation": {"temperature": 0.5, "top_p": 0.9}}))
    args = cli._parser().parse_args(["generate", str(path), "--temperature", "0.7", "--set", "generation.top_p=0.5",
                                     "--greedy"])
    cfg = cli.build_config("generate", args)
    assert (cfg.model, cfg.generation.temperature, cfg.generation.top_p, cfg.generation.greedy) == ("m", 0.7, 0.5, True)
    # the flag defaults are the config's: nothing given means the dataclass default
    bare = cli.build_config("generate", cli._parser().parse_args(["generate"]))
    assert bare.generation == config.GenerationConfig()
    evaluated = cli.build_config("eval", cli._parser().parse_args(["eval", "--model", "x", "--tasks", "rouge,kl",
                                                                   "--limit", "3", "--judge-model", "gpt"]))
    assert evaluated.tasks == ["rouge", "kl"] and evaluated.limit == 3 and evaluated.judge.api_model == "gpt"
    with pytest.raises(config.ConfigError, match="limit: expected int"):
        cli.build_config("eval", cli._parser().parse_args(["eval", "--limit", "many"]))
    with pytest.raises(config.ConfigError, match=r"models.student_layers\[1\]: expected int, got 'x'"):
        config.load_config(config.RunConfig, overrides=["models.student_layers=[1, x]"])


def test_generate_command_through_the_library_entry_point(tiny, tmp_path):
    out = tmp_path / "gen.jsonl"
    code = cli.main(["generate", "--model", str(tiny / "teacher"), "--prompts", str(tiny / "prompts.jsonl"),
                     "--output", str(out), "--limit", "3", "--max-new-tokens", "4", "--dtype", "float32"])
    assert code == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3 and {"id", "response", "finish_reason", "num_tokens"} <= set(rows[0])
    assert all(r["num_tokens"] <= 4 for r in rows)
    assert cli.main(["generate", "--model", str(tiny / "teacher")]) == 2  # prompts and output missing


def _package_modules():
    return {(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def test_no_source_file_over_500_lines():
    for path in list(PACKAGE.rglob("*.py")) + list((ROOT / "benchmarks").glob("*.py")):
        assert len(path.read_text().splitlines()) <= 500, path


def test_package_imports_are_at_the_top_and_acyclic():
    modules = _package_modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("distillm2"):
                        pytest.fail(f"{name}.{node.name} imports {sub.module} inside a function")
        deps = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distillm2"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in modules else node.module)
        graph[name] = {d for d in deps if d in modules and d != "distillm2"}
    graph.pop("distillm2", None)  # the package's __init__ gathers the public API from everything

    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in graph.get(node, ()):
            if state.get(dep) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_nothing_points_outside_the_repository():
    files = [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts and "runs" not in p.parts
             and p.suffix in (".py", ".md", ".yaml", ".toml", ".sh", "")]
    outside = ("DESIGN" + ".md", "../" + "shared")  # spelled so that this file does not match itself
    for path in files:
        text = path.read_text(errors="ignore")
        for needle in outside:
            assert needle not in text, (path, needle)
    assert (ROOT / "docs" / "design.md").exists()


def test_packaged_recipes_are_the_repository_ones():
    for name in ("demo.yaml", "quantized.yaml"):
        assert (ROOT / "configs" / name).read_text() == (PACKAGE / "configs" / name).read_text(), name


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(from distillm2 import EvaluateConfig.*?)```", text, re.S).group(1)
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "demo.yaml", tmp_path / "configs" / "demo.yaml")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    report = namespace["report"]
    assert 0.0 <= report["tasks"]["rouge"]["rouge_l"] <= 1.0 and report["tasks"]["kl"]["forward_kl"] > 0
    assert (tmp_path / "runs" / "api" / "final" / "config.json").exists()
    assert (tmp_path / "runs" / "api" / "eval" / "results.json").exists()


def test_submodules_are_not_shadowed_by_exported_functions():
    """``import distillm2.train`` must give the training loop, not a function of the same name."""
    import importlib

    import distillm2

    for name in ("train", "losses", "generation", "evaluation", "pipeline", "comparison"):
        module = importlib.import_module(f"distillm2.{name}")
        assert getattr(distillm2, name) is module, name
    assert callable(distillm2.train_stage) and callable(distillm2.run)
