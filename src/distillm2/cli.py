"""The ``distillm2`` command: a thin front over the library (each subcommand builds a config and
calls one library function)."""

from __future__ import annotations

import argparse
import sys
from importlib import resources

EPILOGS = {
    "demo": """examples:
  distillm2 demo
  distillm2 demo --output-dir runs/my-demo --set rounds=3 --set train.lr=1e-4""",
    "run": """examples:
  distillm2 run configs/qwen2.5-7b-to-1.5b.yaml
  distillm2 run my.yaml --set rounds=2 --set loss.beta_schedule=constant
  accelerate launch --config_file configs/accelerate/ddp.yaml -m distillm2.cli run my.yaml
Re-running the same command continues an interrupted run.""",
    "generate": """examples:
  distillm2 generate --model smollm2-135m-instruct --prompts prompts.jsonl --output out.jsonl
  distillm2 generate --model Qwen/Qwen2.5-1.5B-Instruct --prompts data.parquet --field question \\
      --output answers.jsonl --max-new-tokens 512 --greedy""",
    "eval": """examples:
  distillm2 eval --model runs/demo/final --teacher smollm2-135m-instruct --tasks rouge,kl,speculative --limit 50
  distillm2 eval --model runs/demo/final --tasks gsm8k --data gsm8k/test.jsonl --limit 200
  distillm2 eval --model runs/demo/final --tasks humaneval --limit 20
  distillm2 eval --model runs/demo/final --teacher smollm2-135m-instruct --tasks judge \
      --judge-model gpt-4o --judge-base-url https://api.openai.com/v1   # key: $OPENAI_API_KEY""",
    "compare": """examples:
  distillm2 compare configs/compare-demo.yaml
  distillm2 compare configs/compare-demo.yaml --set methods=[sft,distillm2]""",
    "train": """examples:
  distillm2 train train.yaml          # pairs: RUN/round-1/pairs.jsonl, models:, train:, loss:
  distillm2 train train.yaml --set loss.name=gkd --set train.lr=1e-4""",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distillm2", description="Distil LLMs with DistiLLM-2 (Ko et al., ICML 2025).")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, help_):
        return sub.add_parser(name, help=help_, description=help_, epilog=EPILOGS.get(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    d = add("demo", "distil the embedded SmolLM2-135M-Instruct into a derived student on this machine, then evaluate")
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")

    r = add("run", "run (or continue) the whole pipeline from a YAML config")
    r.add_argument("config")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    g = add("generate", "sample responses of one model for a prompt file (resumable JSONL)")
    g.add_argument("--model", required=True, help="hub id, local directory or smollm2-135m-instruct")
    g.add_argument("--prompts", required=True, help="prompt file (.jsonl/.json/.parquet/.csv) or demo:<split>")
    g.add_argument("--output", required=True)
    g.add_argument("--field", default=None, help="column with the prompt (string or messages list)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--greedy", action="store_true")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--limit", type=int, default=None)

    e = add("eval", "evaluate a model: rouge, kl, judge, gsm8k, humaneval, speculative")
    e.add_argument("--model", required=True)
    e.add_argument("--teacher", default=None, help="reference model for rouge/judge, needed by kl and speculative")
    e.add_argument("--tasks", default="rouge", help="comma-separated: rouge,kl,judge,gsm8k,humaneval,speculative")
    e.add_argument("--prompts", default="demo:heldout", help="instruction prompts (rouge, kl, judge, speculative)")
    e.add_argument("--data", default=None, help="data file of the gsm8k or humaneval task")
    e.add_argument("--gsm8k-data", default=None)
    e.add_argument("--humaneval-data", default=None)
    e.add_argument("--references", default=None, help='JSONL {"id", "response"}: reference answers (rouge, judge)')
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--output", default="eval.json")
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--judge", default=None, help="local judge model (hub id, directory, embedded name)")
    e.add_argument("--judge-model", default=None, help="judge model name at an OpenAI-compatible endpoint")
    e.add_argument("--judge-base-url", default=None, help="default $OPENAI_BASE_URL")
    e.add_argument("--judge-api-key", default=None, help="default $OPENAI_API_KEY")
    e.add_argument("--gsm8k-fewshot", type=int, default=0)
    e.add_argument("--gsm8k-fewshot-data", default=None)
    e.add_argument("--code-timeout", type=float, default=10.0)

    c = add("compare", "train the baselines and DistiLLM-2 from one student on one budget, evaluate, plot")
    c.add_argument("config")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    t = add("train", "train one stage on an existing pairs file")
    t.add_argument("config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return p


def demo_config(output_dir: str, overrides: list[str]):
    import yaml

    from distillm2.config import RunConfig, load_config

    base = yaml.safe_load(resources.files("distillm2").joinpath("configs/demo.yaml").read_text())
    base["output_dir"] = output_dir
    return load_config(RunConfig, base=base, overrides=overrides)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from distillm2.config import ConfigError
    from distillm2.data import DataError
    from distillm2.models import TokenizerMismatch

    try:
        return _dispatch(args)
    except (ConfigError, DataError, TokenizerMismatch, FileNotFoundError) as err:
        print(f"distillm2 {args.command}: error: {err}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    from distillm2.config import RunConfig, TrainStageConfig, load_config

    if args.command == "demo":
        from distillm2.evaluate import evaluate_run
        from distillm2.pipeline import Run, run

        cfg = demo_config(args.output_dir, args.set)
        run(cfg)
        evaluate_run(Run(cfg), cfg)
    elif args.command == "run":
        from distillm2.evaluate import evaluate_run
        from distillm2.pipeline import Run, run

        cfg = load_config(RunConfig, args.config, args.set)
        run(cfg)
        if cfg.eval.prompts:
            evaluate_run(Run(cfg), cfg)
    elif args.command == "generate":
        from distillm2.data import load_prompts
        from distillm2.generate import generate_hf
        from distillm2.models import load_model, load_tokenizer
        from distillm2.progress import setup_logging

        setup_logging()
        prompts = load_prompts(args.prompts, args.field, args.limit)
        model = load_model(args.model, args.dtype)
        rows = generate_hf(model, load_tokenizer(args.model), prompts, args.output,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, greedy=args.greedy, batch_size=args.batch_size, seed=args.seed)
        print(f"{len(rows)} responses in {args.output}")
    elif args.command == "eval":
        from distillm2.data import DataError
        from distillm2.progress import setup_logging
        from distillm2.tasks import EvalCommandConfig, run_eval

        setup_logging()
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        gsm8k_data, humaneval_data = args.gsm8k_data, args.humaneval_data
        if args.data:
            targets = [t for t in tasks if t in ("gsm8k", "humaneval")]
            if len(targets) != 1:
                raise DataError("--data names the data of exactly one of gsm8k / humaneval; "
                                "use --gsm8k-data and --humaneval-data for both")
            gsm8k_data, humaneval_data = (args.data, humaneval_data) if targets[0] == "gsm8k" else (gsm8k_data, args.data)
        run_eval(EvalCommandConfig(
            model=args.model, teacher=args.teacher, tasks=tasks, prompts=args.prompts, gsm8k_data=gsm8k_data,
            humaneval_data=humaneval_data, references=args.references, limit=args.limit, output=args.output,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, dtype=args.dtype, judge=args.judge,
            judge_model=args.judge_model, judge_base_url=args.judge_base_url, judge_api_key=args.judge_api_key,
            gsm8k_fewshot=args.gsm8k_fewshot, gsm8k_fewshot_data=args.gsm8k_fewshot_data,
            code_timeout=args.code_timeout))
    elif args.command == "compare":
        from distillm2.compare import CompareConfig, compare

        compare(load_config(CompareConfig, args.config, args.set))
    elif args.command == "train":
        from distillm2.pipeline import train_from_pairs

        cfg = load_config(TrainStageConfig, args.config, args.set)
        out = train_from_pairs(cfg)
        print(f"trained student in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
