"""Preference pairs for the alignment comparison of docs/results.md (issue #13, item 1).

DistiLLM-2 §5.1 aligns distilled students with DPO and finds a distilled student the better
starting point. No preference data set ships offline, so this script builds one that needs no
judge: for demo:train prompts that the comparison's students never trained on (those after the
first ``--skip``), the teacher's sampled response is preferred to the initial student's sampled
response (the SFT-warmed student every method of the comparison starts from). Both are sampled
with the comparison's generation settings (the paper's temperature 0.8 and top-p 0.95, 48 new
tokens). Written in TRL's conversational preference layout, which ``align.pairs`` reads.

    python benchmarks/prefs.py --student runs/compare-demo/seed-42/shared/final \
        --output runs/prefs/pairs.jsonl

Resumable: the two generations are ordinary ``distillm2 generate`` outputs next to the pairs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distillm2.config import GenerateConfig, GenerationConfig
from distillm2.data import demo_prompts
from distillm2.files import read_jsonl, write_jsonl
from distillm2.generation import generate
from distillm2.pairs import make_pairs, write_pairs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--student", required=True, help="the model whose samples are rejected")
    parser.add_argument("--output", default="runs/prefs/pairs.jsonl")
    parser.add_argument("--skip", type=int, default=96, help="demo:train prompts the students trained on")
    parser.add_argument("--count", type=int, default=192, help="pairs to build")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    prompts = demo_prompts("train")[args.skip:args.skip + args.count]
    prompt_file = out.parent / "prompts.jsonl"
    write_jsonl(prompt_file, [{"id": p["id"], "messages": p["messages"]} for p in prompts])
    settings = GenerationConfig(max_new_tokens=48, batch_size=64, dtype="bfloat16")
    responses = {}
    for role, model in (("chosen", args.teacher), ("rejected", args.student)):
        path = out.parent / f"{role}.jsonl"
        generate(GenerateConfig(model=model, prompts=str(prompt_file), output=str(path), seed=args.seed,
                                max_prompt_length=128, generation=settings))
        responses[role] = read_jsonl(path)
    pairs, missing = make_pairs(prompts, responses["chosen"], responses["rejected"])
    if missing:
        raise SystemExit(f"{missing} prompts lack a response; rerun to finish the generations")
    write_pairs(out, pairs)
    print(f"{len(pairs)} pairs in {out} (chosen: {args.teacher}, rejected: {args.student})")


if __name__ == "__main__":
    main()
