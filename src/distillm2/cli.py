"""The ``distillm2`` command: a thin front over the library. Every command takes an optional
YAML config, ``--set key=value`` overrides and a few flags for the keys people type most; each
builds its config (:mod:`distillm2.config`, where every default and help line lives) and calls
one library function. Expected failures print one line and exit with status 2."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
import typing
from importlib import resources

import yaml

from distillm2 import check, comparison, config, evaluation, generation, hub, pipeline, plots
from distillm2._version import __version__
from distillm2.errors import UserError
from distillm2.progress import set_verbosity

EPILOGS = {
    "demo": """examples:
  distillm2 demo
  distillm2 demo --output-dir runs/my-demo --set rounds=3 --set train.lr=1e-4""",
    "run": """examples:
  distillm2 run configs/qwen2.5-7b-to-1.5b.yaml
  distillm2 run my.yaml --set rounds=2 --set loss.beta_schedule=constant
  accelerate launch --config_file configs/accelerate/ddp.yaml -m distillm2 run my.yaml
Re-running the same command continues an interrupted run.""",
    "generate": """examples:
  distillm2 generate --model smollm2-135m-instruct --prompts prompts.jsonl --output out.jsonl
  distillm2 generate --model Qwen/Qwen2.5-1.5B-Instruct --prompts data.parquet --field question \\
      --output answers.jsonl --max-new-tokens 512 --greedy""",
    "eval": """examples:
  distillm2 eval --model runs/demo/final --teacher smollm2-135m-instruct --tasks rouge,kl,speculative --limit 50
  distillm2 eval --model runs/demo/final --tasks gsm8k --gsm8k-data gsm8k/test.jsonl --limit 200
  distillm2 eval --model runs/demo/final --tasks humaneval --limit 20
  distillm2 eval --model runs/demo/final --teacher smollm2-135m-instruct --tasks judge \\
      --judge-model gpt-4o --judge-base-url https://api.openai.com/v1   # key: $OPENAI_API_KEY""",
    "compare": """examples:
  distillm2 compare configs/compare-demo.yaml
  distillm2 compare configs/compare-demo.yaml --set methods=[sft,distillm2]""",
    "train": """examples:
  distillm2 train train.yaml          # pairs: RUN/round-1/pairs.jsonl, models:, train:, loss:
  distillm2 train train.yaml --set loss.name=gkd --set train.lr=1e-4""",
    "check": """examples:
  distillm2 check configs/qwen2.5-7b-to-1.5b.yaml --processes 8
  distillm2 check my.yaml --processes 2 --engine zero3 --device-memory 40""",
    "plot": """examples:
  distillm2 plot runs/demo              # writes runs/demo/curves.png""",
    "push": """examples:
  distillm2 push runs/demo --model-id me/smollm2-distilled    # token: HF_TOKEN or `hf auth login`""",
    "config": """examples:
  distillm2 config show run
  distillm2 config show eval""",
}

HELP = {
    "demo": "distil the embedded SmolLM2-135M-Instruct into a derived student on this machine, then evaluate",
    "run": "run (or continue) the whole pipeline from a YAML config",
    "train": "train one stage on an existing pairs file",
    "generate": "sample responses of one model for a prompt file (resumable JSONL)",
    "eval": "evaluate a model: " + ", ".join(("rouge", "kl", "self", "judge", "gsm8k", "humaneval", "speculative",
                                              "lm_eval:<task>")),
    "compare": "train the baselines and DistiLLM-2 from one student on one budget, evaluate, plot",
    "config": "print every key of a command's config with its default and help",
    "plot": "draw a run's training curves (loss terms, alpha, beta, lr, grad norm, tokens/s) into a PNG",
    "push": "upload a run's final student with its model card to the Hugging Face Hub",
    "check": "resolve a run config's models, tokenizers and data; print batch, steps and a memory estimate",
}

# The flags of each command: flag -> config key (type, default and help come from the field).
FLAGS = {
    "demo": {"--output-dir": "output_dir"},
    "run": {"--output-dir": "output_dir"},
    "train": {"--output-dir": "output_dir", "--pairs": "pairs"},
    "compare": {"--output-dir": "output_dir"},
    "generate": {"--model": "model", "--prompts": "prompts", "--output": "output", "--field": "field",
                 "--limit": "limit", "--seed": "seed", "--max-new-tokens": "generation.max_new_tokens",
                 "--temperature": "generation.temperature", "--top-p": "generation.top_p",
                 "--greedy": "generation.greedy", "--batch-size": "generation.batch_size",
                 "--dtype": "generation.dtype", "--backend": "generation.backend", "--device": "device"},
    "eval": {"--model": "model", "--teacher": "teacher", "--tasks": "tasks", "--prompts": "prompts",
             "--references": "references", "--limit": "limit", "--output": "output",
             "--max-new-tokens": "max_new_tokens", "--batch-size": "batch_size", "--dtype": "dtype", "--device": "device",
             "--judge": "judge.model", "--judge-model": "judge.api_model", "--judge-base-url": "judge.base_url",
             "--judge-api-key": "judge.api_key", "--gsm8k-data": "gsm8k.data", "--humaneval-data": "humaneval.data",
             "--completions": "humaneval.completions", "--export-alpaca-eval": "export_alpaca_eval",
             "--judge-temperature": "judge.temperature", "--judge-concurrency": "judge.concurrency",
             "--gsm8k-fewshot": "gsm8k.fewshot", "--max-prompt-length": "max_prompt_length",
             "--lm-eval-include-path": "lm_eval.include_path", "--lm-eval-backend": "lm_eval.backend"},
}
CONFIG_REQUIRED = ("run", "compare", "train", "check")


def _field(cls, key: str):
    """The dataclass field and type hint behind a dotted config key."""
    *sections, name = key.split(".")
    for section in sections:
        cls = typing.get_type_hints(cls)[section]
    return next(f for f in dataclasses.fields(cls) if f.name == name), typing.get_type_hints(cls)[name]


def _add_flags(parser, command: str) -> None:
    cls = config.COMMANDS[command]
    for flag, key in FLAGS.get(command, {}).items():
        f, hint = _field(cls, key)
        meta = f.metadata
        help_ = f"{meta.get('help', '')} ({key})"
        if hint is bool:
            parser.add_argument(flag, dest=key, action="store_const", const=True, default=None, help=help_)
            continue
        choices = meta.get("choices")
        parser.add_argument(flag, dest=key, default=None, help=help_, metavar=key.split(".")[-1].upper(),
                            choices=choices if isinstance(choices, tuple) else None)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distillm2", description="Distil LLMs with DistiLLM-2 (Ko et al., ICML 2025).")
    p.add_argument("--version", action="version", version=f"distillm2 {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in ("demo", "run", "train", "generate", "eval", "compare", "check"):
        s = sub.add_parser(command, help=HELP[command], description=HELP[command], epilog=EPILOGS.get(command),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if command in CONFIG_REQUIRED:
            s.add_argument("config", help=f"YAML config (see `distillm2 config show {command}`)")
        else:
            s.add_argument("config", nargs="?", default=None,
                           help=f"optional YAML config (see `distillm2 config show {command}`)")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config key, e.g. --set train.lr=1e-4 (repeatable; the value is YAML)")
        s.add_argument("-v", "--verbose", action="count", default=0, help="debug messages, tracebacks on errors")
        s.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only")
        if command == "demo":
            s.add_argument("--recipe", default="demo", choices=["demo", "quantized"],
                           help="demo: distillation into a derived student; quantized: recovery of a 4-bit student")
        if command in ("run", "demo", "train", "compare"):
            s.add_argument("--force", action="store_true",
                           help="continue a run directory whose saved config differs in what changes results")
        if command == "generate":
            s.add_argument("--force", action="store_true",
                           help="replace an output file made with other settings (model, decoding, seed, ...)")
        _add_flags(s, command)
        if command == "check":
            s.add_argument("--processes", type=int, default=1, help="processes the run will be launched with")
            s.add_argument("--engine", default="ddp", choices=["ddp", "fsdp", "zero3"],
                           help="how the processes share the models")
            s.add_argument("--device-memory", type=float, default=None, metavar="GIB",
                           help="memory per device (default: this machine's GPU, else 80)")
    pl = sub.add_parser("plot", help=HELP["plot"], description=HELP["plot"], epilog=EPILOGS["plot"],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("run_dir", help="a run directory (or a stage directory's parent)")
    pl.add_argument("--output", default=None, help="PNG path (default RUN/curves.png)")
    pu = sub.add_parser("push", help=HELP["push"], description=HELP["push"], epilog=EPILOGS["push"],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pu.add_argument("run_dir", help="a finished run directory (its final/ is uploaded)")
    pu.add_argument("--model-id", required=True, help="the Hub repository, user/name")
    pu.add_argument("--public", action="store_true", help="create the repository public (default private)")
    for extra in (pl, pu):
        extra.add_argument("-v", "--verbose", action="count", default=0, help="tracebacks on errors")
        extra.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only")
    c = sub.add_parser("config", help=HELP["config"], description=HELP["config"], epilog=EPILOGS["config"],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("action", choices=["show"])
    c.add_argument("name", choices=sorted(config.COMMANDS), help="the command whose config to show")
    return p


def demo_base(recipe: str = "demo") -> dict:
    """A bundled recipe (``configs/<recipe>.yaml`` in the package)."""
    return yaml.safe_load(resources.files("distillm2").joinpath(f"configs/{recipe}.yaml").read_text())


def build_config(command: str, args) -> object:
    """The command's config: its YAML, then the flags given, then ``--set`` (later wins)."""
    cls = config.COMMANDS[command]
    values = {}
    for key in FLAGS.get(command, {}).values():
        value = getattr(args, key, None)
        if value is None:
            continue
        hint = _field(cls, key)[1]
        if typing.get_origin(hint) is list:
            value = [item.strip() for item in value.split(",") if item.strip()]
        elif hint in (int, float) or set(typing.get_args(hint)) & {int, float}:
            number = int if int in (hint, *typing.get_args(hint)) else float
            try:
                value = number(value)
            except ValueError:
                raise config.ConfigError(f"{key}: expected {number.__name__}, got {value!r}") from None
        values[key] = value
    base = demo_base(getattr(args, "recipe", "demo")) if command == "demo" else None
    return config.load_config(cls, args.config, list(args.set), base=base, values=values)


def main(argv=None) -> int:
    """Entry point of the ``distillm2`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    verbose = getattr(args, "verbose", 0)
    set_verbosity(verbose, getattr(args, "quiet", 0))
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        if verbose:
            raise
        # Every stage resumes (generation by prompt id, training from its last checkpoint), and
        # every write is atomic: the same command continues. 130 = 128 + SIGINT, as shells use.
        again = " ".join(["distillm2", *(argv if argv is not None else sys.argv[1:])])
        print(f"\ndistillm2 {args.command}: interrupted; finished stages and the last checkpoint are kept: "
              f"`{again}` continues", file=sys.stderr)
        return 130
    except (UserError, FileNotFoundError, OSError) as err:
        if isinstance(err, OSError) and not isinstance(err, (UserError, FileNotFoundError)) \
                and err.errno not in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
            raise  # not an input problem: a bug or the system; the traceback says where
        if verbose:
            raise
        message = str(err)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            message = f"no space left on the device while writing {err.filename or 'a file'}; free space and " \
                      "rerun the same command: it continues where it stopped"
        print(f"distillm2 {args.command}: error: {message}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    if args.command == "config":
        print(config.describe(config.COMMANDS[args.name]))
        return 0
    if args.command == "plot":
        print(plots.plot_run(args.run_dir, args.output))
        return 0
    if args.command == "push":
        print(hub.push(args.run_dir, args.model_id, private=not args.public))
        return 0
    cfg = build_config(args.command, args)
    if args.command in ("demo", "run"):
        pipeline.run(cfg, force=args.force)
    elif args.command == "train":
        print(f"trained student in {pipeline.train_stage(cfg, force=args.force)}")
    elif args.command == "generate":
        generation.generate(cfg, force=args.force)
    elif args.command == "eval":
        evaluation.evaluate(cfg)
    elif args.command == "compare":
        comparison.compare(cfg, force=args.force)
    elif args.command == "check":
        check.check(cfg, args.processes, args.engine, args.device_memory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
