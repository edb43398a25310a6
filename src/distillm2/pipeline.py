"""Rounds of DistiLLM-2 (Algorithm 1): teacher responses -> [SFT warm-up] -> for each round:
student responses from the current student -> pairs -> one epoch of training -> final model.

Everything lands in the run directory of DESIGN.md §4, and every stage is resumable: generation
skips finished prompt ids, training resumes from its last checkpoint, and a stage whose output
exists (``<stage>/model/``) is not redone. Re-running the same command continues a crashed run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from distillm2.config import RunConfig, to_yaml
from distillm2.data import load_prompts, make_pairs, read_jsonl, write_jsonl, write_text_atomic
from distillm2.losses import LOSSES
from distillm2.progress import logger, setup_logging


def make_accelerator(mixed_precision: str = "no"):
    from accelerate import Accelerator

    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU") == "1"
    return Accelerator(mixed_precision=mixed_precision, cpu=use_cpu)


def place_teacher(accelerator, teacher):
    """Put the frozen teacher where the run needs it: replicated under DDP, sharded under
    DeepSpeed ZeRO-3 (an inference engine) or FSDP."""
    from accelerate.utils import DistributedType

    teacher.eval().requires_grad_(False)
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        ds_cfg = dict(accelerator.state.deepspeed_plugin.deepspeed_config)
        if ds_cfg.get("zero_optimization", {}).get("stage") == 3:
            import deepspeed

            ds_cfg.pop("optimizer", None)
            ds_cfg.pop("scheduler", None)
            engine, *_ = deepspeed.initialize(model=teacher, config=ds_cfg)
            return engine.eval()
    if kind == DistributedType.FSDP:
        return accelerator.prepare_model(teacher)
    return teacher.to(accelerator.device)


def _crash_point(stage: str) -> int | None:
    """Test-only fault injection: DISTILLM2_CRASH=<stage>:<n> kills the process after n batches
    (generation) or n steps (training) of the named stage, e.g. ``round-1/student:1``."""
    spec = os.environ.get("DISTILLM2_CRASH", "")
    name, _, n = spec.rpartition(":")
    return int(n) if spec and name == stage else None


class Run:
    """A run directory and the objects shared by its stages."""

    def __init__(self, cfg: RunConfig, prompts: list[dict] | None = None):
        from distillm2 import models

        setup_logging()
        self.cfg = cfg
        self.dir = Path(cfg.output_dir)
        self.acc = make_accelerator(cfg.train.mixed_precision)
        self.main = self.acc.is_main_process
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            saved = self.dir / "config.yaml"
            if saved.exists() and saved.read_text() != to_yaml(cfg):
                logger.warning("%s differs from this run's config; continuing with the new one", saved)
            write_text_atomic(saved, to_yaml(cfg))
        self.acc.wait_for_everyone()
        self.prompts = self._prompts(prompts)
        mc = cfg.models
        self.tokenizer = models.load_tokenizer(mc.student or mc.teacher)
        teacher_tok = models.load_tokenizer(mc.teacher)
        self.teacher = models.load_model(mc.teacher, mc.teacher_dtype, attn_implementation=mc.attn_implementation)
        self._make_student_init()
        init_model = models.load_model(str(self.dir / "student-init"), "float32")
        # Checked before any work: a mismatch is an error here, not a silent garbage loss later.
        self.vocab = models.check_tokenizers(teacher_tok, self.tokenizer, self.teacher, init_model)
        del init_model
        self.teacher = place_teacher(self.acc, self.teacher)

    def _prompts(self, given=None) -> list[dict]:
        path = self.dir / "prompts.jsonl"
        if not path.exists() and self.main:
            records = given if given is not None else load_prompts(
                self.cfg.data.prompts, self.cfg.data.field, self.cfg.data.max_prompts)
            write_jsonl(path, records)
        self.acc.wait_for_everyone()
        return read_jsonl(path)

    def _make_student_init(self):
        """RUN/student-init: the student before any training (loaded, or derived from the
        teacher), saved so that every later stage and a resumed run start from the same weights."""
        from distillm2 import models

        target = self.dir / "student-init"
        mc = self.cfg.models
        if not (target / "config.json").exists() and self.main:
            if mc.student:
                student = models.load_model(mc.student, "float32", attn_implementation=mc.attn_implementation)
            else:
                full = models.load_model(mc.teacher, "float32")
                n = mc.student_num_layers
                if mc.student_layers is None and n is None:
                    n = max(1, full.config.num_hidden_layers // 2)
                student = models.derive_student(full, layers=mc.student_layers, num_layers=n)
                del full
            tmp = target.with_name("student-init.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            student.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            tmp.rename(target)
        self.acc.wait_for_everyone()

    def load_student(self, stage_model: Path | None):
        """The student after ``stage_model`` (a finished stage's ``model/``), or the initial one."""
        from distillm2 import models

        mc = self.cfg.models
        if stage_model is not None and not mc.lora:
            return models.load_model(str(stage_model), mc.dtype, attn_implementation=mc.attn_implementation)
        base = models.load_model(str(self.dir / "student-init"), mc.dtype, attn_implementation=mc.attn_implementation)
        if not mc.lora:
            return base
        if stage_model is None:
            return models.add_lora(base, mc.lora_r, mc.lora_alpha, mc.lora_dropout, mc.lora_target_modules)
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(stage_model), is_trainable=True)

    # stages -----------------------------------------------------------------------------------

    def generate(self, model, out: Path, stage: str, *, greedy=None, prompts=None, max_new_tokens=None):
        """Responses of ``model`` for the run's prompts into ``out`` (resumable, all ranks)."""
        from distillm2 import models
        from distillm2.generate import generate_hf, generate_vllm, merge_parts

        g = self.cfg.generation
        prompts = self.prompts if prompts is None else prompts
        kwargs = dict(max_new_tokens=max_new_tokens or g.max_new_tokens, temperature=g.temperature,
                      top_p=g.top_p, greedy=g.greedy if greedy is None else greedy,
                      seed=self.cfg.train.seed, max_prompt_length=self.cfg.data.max_prompt_length)
        done = {r["id"] for r in read_jsonl(out)} if out.exists() else set()
        if all(p["id"] in done for p in prompts):
            return read_jsonl(out)
        if g.backend == "vllm":
            rows = None
            if self.main:
                export = out.parent / f".{out.stem}-model"
                save_model(model, self.tokenizer, export)
                rows = generate_vllm(str(export), self.tokenizer, prompts, out, **kwargs)
                shutil.rmtree(export, ignore_errors=True)
            self.acc.wait_for_everyone()
            return rows if rows is not None else read_jsonl(out)
        gen_model = self.acc.unwrap_model(model)
        if models.is_peft(gen_model) or next(gen_model.parameters()).dtype != models.DTYPES[g.dtype]:
            # a merged copy in the sampling dtype (bf16 weights sample ~2x faster on CPU)
            gen_model = models.plain_copy(gen_model, g.dtype).to(self.acc.device)
        generate_hf(gen_model, self.tokenizer, prompts, out, batch_size=g.batch_size,
                    rank=self.acc.process_index, world_size=self.acc.num_processes, desc=stage,
                    crash_after_batches=_crash_point(stage), **kwargs)
        del gen_model
        self.acc.wait_for_everyone()
        if self.main:
            merge_parts(out, prompts, self.acc.num_processes)
        self.acc.wait_for_everyone()
        return read_jsonl(out)

    def train_stage(self, student, pairs, stage_dir: Path, loss_cfg, epochs, schedule):
        """One training stage; returns the trained student and writes ``stage_dir/model``."""
        import dataclasses

        from distillm2.train import Trainer

        train_cfg = dataclasses.replace(self.cfg.train, epochs=epochs)
        trainer = Trainer(self.acc, student, self.teacher if loss_cfg.name not in ("sft", "seqkd") else None,
                          self.tokenizer, pairs, train_cfg, loss_cfg, stage_dir, self.vocab,
                          self.cfg.data.max_prompt_length, self.cfg.data.max_length, schedule,
                          stage_seed=self.cfg.train.seed * 1009 + schedule.round_index,
                          crash_after_steps=_crash_point(f"{stage_dir.name}/train"))
        student = trainer.fit()
        if self.main:
            tmp = stage_dir / "model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            student.save_pretrained(tmp)  # adapter only under LoRA
            tmp.rename(stage_dir / "model")
            # The stage is finished and its model saved: the optimiser state is dead weight.
            shutil.rmtree(stage_dir / "checkpoint", ignore_errors=True)
        self.acc.wait_for_everyone()
        return student


def save_model(model, tokenizer, target: Path, cfg=None) -> None:
    """save_pretrained of a standalone copy (LoRA merged) with its tokenizer, atomically."""
    from distillm2 import models

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    models.plain_copy(model).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if cfg is not None:
        (tmp / "distillm2_config.yaml").write_text(to_yaml(cfg))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def run(cfg: RunConfig) -> Path:
    """Run (or continue) the whole pipeline; returns the run directory."""
    import dataclasses

    from distillm2.train import Schedule, num_steps

    r = Run(cfg)
    first = r.dir / "round-1" / "teacher.jsonl"
    teacher_rows = r.generate(r.teacher, first, "round-1/teacher")
    student, previous = None, None

    if cfg.sft_epochs > 0:
        sft_dir = r.dir / "sft"
        if (sft_dir / "model").exists():
            previous = sft_dir / "model"
        else:
            pairs, _ = make_pairs(r.prompts, teacher_rows, [dict(t, response="") for t in teacher_rows])
            sft_loss = dataclasses.replace(cfg.loss, name="sft")
            student = r.train_stage(r.load_student(None), pairs, sft_dir, sft_loss, cfg.sft_epochs,
                                    Schedule(round_index=0))
            previous = sft_dir / "model"

    steps_per_round = num_steps(len(r.prompts), cfg.train, r.acc.num_processes)
    total = steps_per_round * cfg.rounds
    for k in range(1, cfg.rounds + 1):
        rdir = r.dir / f"round-{k}"
        if (rdir / "model").exists():
            student, previous = None, rdir / "model"
            continue
        if student is None:
            student = r.load_student(previous)
        if k > 1 and cfg.generation.teacher_per_round:
            teacher_rows = r.generate(r.teacher, rdir / "teacher.jsonl", f"round-{k}/teacher")
        if "rejected" in LOSSES[cfg.loss.name].rows:
            student_rows = r.generate(student, rdir / "student.jsonl", f"round-{k}/student")
        else:  # sft, seqkd, kd never read student responses: do not sample them
            student_rows = [dict(t, response="", finish_reason="length") for t in teacher_rows]
        pairs, missing = make_pairs(r.prompts, teacher_rows, student_rows)
        if missing:
            logger.warning("round %d: %d prompts lack a teacher or student response", k, missing)
        if r.main:
            write_jsonl(rdir / "pairs.jsonl", pairs)
        r.acc.wait_for_everyone()
        schedule = Schedule(round_index=k, step_offset=(k - 1) * steps_per_round, total_steps=total)
        student = r.train_stage(student, pairs, rdir, cfg.loss, cfg.train.epochs, schedule)
        previous = rdir / "model"

    final = r.dir / "final"
    if not (final / "config.json").exists():
        if student is None:
            student = r.load_student(previous)
        if r.main:
            save_model(student, r.tokenizer, final, cfg)
        r.acc.wait_for_everyone()
    if r.main:
        write_text_atomic(r.dir / "status.json", json.dumps({"finished": True, "rounds": cfg.rounds}))
    return r.dir


def train_from_pairs(cfg) -> Path:
    """``distillm2 train``: one stage of ``cfg.loss`` on the pairs file ``cfg.pairs``; the student
    lands in ``OUTPUT/final``. Resumable like a run."""
    from distillm2.data import DataError, load_pairs
    from distillm2.train import Schedule

    if not cfg.pairs:
        raise DataError("train: set `pairs:` to a pairs JSONL file ({id, prompt, chosen, rejected})")
    pairs = load_pairs(cfg.pairs)
    run_cfg = RunConfig(output_dir=cfg.output_dir, rounds=1, models=cfg.models, data=cfg.data,
                        train=cfg.train, loss=cfg.loss)
    run_cfg.eval.prompts = None
    r = Run(run_cfg, prompts=[{"id": p["id"], "messages": p["prompt"]} for p in pairs])
    stage = r.dir / "train"
    if (stage / "model").exists():
        student = r.load_student(stage / "model")
    else:
        student = r.train_stage(r.load_student(None), pairs, stage, cfg.loss, cfg.train.epochs, Schedule())
    final = r.dir / "final"
    if r.main:
        save_model(student, r.tokenizer, final, cfg)
    r.acc.wait_for_everyone()
    return final
