"""Rounds of DistiLLM-2 (Algorithm 1): teacher responses -> [SFT warm-up] -> for each round:
student responses from the current student -> pairs -> one epoch of training -> final model ->
held-out evaluation.

Everything lands in the run directory (docs/design.md), and every stage is resumable: generation
skips finished prompt ids, training resumes from its last checkpoint, and a stage whose output
exists (``<stage>/model/``) is not redone. Re-running the same command continues a crashed run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import yaml

from distillm2 import distributed, models, precision, vision
from distillm2.checkpoint import remove_checkpoint
from distillm2.config import (
    LossConfig,
    RunConfig,
    TrainStageConfig,
    check_trains_something,
    to_yaml,
)
from distillm2.data import load_prompts
from distillm2.errors import ConfigError, DataError
from distillm2.evaluation.held_out import evaluate_models
from distillm2.evaluation.report import write_held_out
from distillm2.files import (
    atomic_dir,
    read_jsonl,
    write_json_atomic,
    write_jsonl,
    write_text_atomic,
)
from distillm2.generation import generate_responses
from distillm2.hub import push, write_model_card
from distillm2.losses import LOSSES, topk_unsupported
from distillm2.pairs import load_pairs, make_pairs, write_pairs
from distillm2.progress import is_main_process, logger, setup_logging
from distillm2.teacher_cache import check_topk
from distillm2.train import Schedule, Trainer, num_steps

# Keys that do not change what a run computes: a run directory may continue under new values.
NOT_RESULT_KEYS = ("output_dir", "eval.", "train.log_every", "train.checkpoint_every", "train.report_to",
                   "train.run_name", "train.project", "generation.server_concurrency", "generation.server_timeout",
                   "generation.server_url", "generation.student_server_url", "hub.", "version")


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def tracker_config(cfg) -> dict:
    """The run's config flattened to the scalars trackers accept (lists as text)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in _flat(yaml.safe_load(to_yaml(cfg))).items() if v is not None}


def check_saved_config(run_dir: Path, cfg, force: bool, resolved=None) -> None:
    """Refuse a run directory whose saved config differs from ``cfg`` in anything that changes
    results (its finished stages would be silently reused), unless ``force``. ``resolved``: the
    same config with its ``auto`` precisions resolved; a saved explicit value equal to what
    ``auto`` resolves to is no change (a run made before ``auto`` was the default)."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.exists():
        return
    old, new = _flat(yaml.safe_load(saved.read_text()) or {}), _flat(yaml.safe_load(to_yaml(cfg)))
    also = _flat(yaml.safe_load(to_yaml(resolved))) if resolved is not None else new
    # A key added after the run was made behaved as its default there (e.g. models.freeze_vision_tower).
    defaults = _flat(yaml.safe_load(to_yaml(type(cfg)())))
    changed = sorted(k for k in set(old) | set(new) if old.get(k, defaults.get(k)) not in (new.get(k), also.get(k))
                     and not any(k == p or (p.endswith(".") and k.startswith(p)) for p in NOT_RESULT_KEYS))
    if "rounds" in changed and isinstance(old.get("rounds"), int) and new["rounds"] > old["rounds"]:
        changed.remove("rounds")  # more rounds continue a run; the finished ones stay as they are
    if not changed:
        return
    detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
    if not force:
        raise ConfigError(f"{saved} differs from this config in {detail}; the finished stages there were made with "
                          "the old values. Use a new output_dir, or --force to continue with the new config")
    logger.warning("%s differs in %s; continuing with the new config (--force)", saved, detail)


class Run:
    """A run directory and the objects its stages share: the accelerator, the prompts, the
    tokenizer, the placed teacher and the vocabulary width to distil over. ``teacher`` may be
    handed in by a caller that already holds it (``compare``), so it is loaded once; so may
    ``topk_dir``, where the teacher's top-k cache lives (``train.teacher_topk``; default
    ``RUN/teacher-topk``), which ``compare`` shares between its methods."""

    def __init__(self, cfg: RunConfig, prompts: list[dict] | None = None, teacher=None, force: bool = False,
                 topk_dir: str | Path | None = None):
        setup_logging()
        self.dir = Path(cfg.output_dir)
        self.topk_dir = Path(topk_dir) if topk_dir is not None else self.dir / "teacher-topk"
        main, world = is_main_process(), int(os.environ.get("WORLD_SIZE", "1"))
        if cfg.rounds > 0:  # before any work: the rounds' loss must be one the cache can serve
            check_topk(cfg.train.teacher_topk, cfg.loss.name, cfg.train.fused_loss, world)
        # Every input is loaded and checked before anything is measured, loaded or written: the
        # cheap checks (tokenizers, prompts) first.
        mc = cfg.models
        self.tokenizer = models.load_tokenizer(mc.student or mc.teacher)
        teacher_tok = models.load_tokenizer(mc.teacher)
        models.check_tokenizers(teacher_tok, self.tokenizer)  # the vocabularies; the heads once loaded
        if not mc.student and not (self.dir / "student-init" / "config.json").exists():
            models.student_layers_of(mc.teacher, mc.student_layers, mc.student_num_layers, **mc.teacher_kwargs)
        prompts_path, init_dir = self.dir / "prompts.jsonl", self.dir / "student-init"
        new_prompts = new_student = None
        if main and not prompts_path.exists():
            d = cfg.data
            new_prompts = prompts if prompts is not None else load_prompts(
                d.prompts, d.field, d.max_prompts, d.response_field, d.columns,
                {"config": d.dataset_config, "split": d.split, "revision": d.revision,
                 "data_files": d.data_files, "streaming": d.streaming})
            if not new_prompts:
                raise DataError(f"{cfg.data.prompts}: no prompts")
            vision.check_run(cfg, new_prompts, teacher_tok, self.tokenizer)  # image prompts: VLMs, hf, ...
        # ``auto`` precisions resolved for this machine (or as the run recorded them); the config
        # as given is what config.yaml keeps, so that a rerun of the same command matches it.
        given = cfg
        cfg, self._precision_record = precision.resolve_run(cfg, self.dir)
        self.cfg = cfg
        mc = cfg.models
        self.acc = distributed.make_accelerator(cfg.train.mixed_precision, cfg.train.report_to, self.dir / "logs")
        self.main = self.acc.is_main_process
        check_saved_config(self.dir, given, force, resolved=cfg)
        if cfg.train.report_to:
            name = cfg.train.run_name or self.dir.name
            self.acc.init_trackers(cfg.train.project, config=tracker_config(cfg),
                                   init_kwargs={"wandb": {"name": name}, "mlflow": {"run_name": name},
                                                "trackio": {"name": name}})
        with distributed.replicated_loading(self.acc):
            if teacher is None:
                teacher = models.load_model(mc.teacher, mc.teacher_dtype, attn_implementation=self._given_attention(),
                                            **mc.teacher_kwargs)
            if self.main and not (init_dir / "config.json").exists():
                new_student = self._initial_student()
        teacher_module = distributed.generation_module(teacher)
        if new_student is not None:
            # Checked before any work: a mismatch is an error here, not a silent garbage loss later.
            models.check_tokenizers(teacher_tok, self.tokenizer, teacher_module, new_student)
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.dir / "config.yaml", to_yaml(given))
            if self._precision_record is not None:
                write_json_atomic(self.dir / "precision.json", self._precision_record)
            if new_prompts is not None:
                write_jsonl(prompts_path, new_prompts)
            if new_student is not None:
                with atomic_dir(init_dir) as tmp:
                    new_student.save_pretrained(tmp)
                    vision.save_tokenizer(self.tokenizer, tmp)  # with a VLM's processor
        del new_student
        self.acc.wait_for_everyone()
        self.prompts = read_jsonl(prompts_path)
        if new_prompts is None:  # a continued run: its prompts against this config
            vision.check_run(cfg, self.prompts, teacher_tok, self.tokenizer)
        with distributed.replicated_loading(self.acc):
            init_model = models.load_model(str(init_dir), "float32")
        self.vocab = models.check_tokenizers(teacher_tok, self.tokenizer, teacher_module, init_model)
        self.attention = self._choose_attention(init_model)
        if mc.attn_implementation == "auto" and hasattr(teacher_module, "set_attn_implementation"):
            teacher_module.set_attn_implementation(self.attention)
        del init_model
        self.teacher = distributed.place_teacher(self.acc, teacher, models.DTYPES[mc.teacher_dtype])

    def _given_attention(self) -> str | None:
        value = self.cfg.models.attn_implementation
        return None if value == "auto" else value

    def _choose_attention(self, student) -> str | None:
        """models.attn_implementation, or for ``auto`` the faster of sdpa and eager for the run's
        shapes on this device: measured once on the main process, kept in RUN/attention.json so
        that every rank and every resumed stage uses the same kernel."""
        if self.cfg.models.attn_implementation != "auto":
            return self.cfg.models.attn_implementation
        path = self.dir / "attention.json"
        if self.main and not path.exists():
            rows = self.cfg.train.batch_size * 2
            length = min(self.cfg.data.max_length, 64 + self.cfg.generation.max_new_tokens)
            key = f"{self.acc.device.type}|{self.acc.mixed_precision}|{student.config.to_json_string(use_diff=True)}|{rows}|{length}"
            known = models.cache_dir() / "attention.json"  # measured once per machine, model and shape
            table = json.loads(known.read_text()) if known.exists() else {}
            if key not in table:
                logger.info("attention: timing %s for [%d x %d] training rows on a one-layer copy of the student "
                            "(once per machine and shape, a few seconds)", " and ".join(models.ATTENTION_CANDIDATES),
                            rows, length)
                with self.acc.autocast():
                    times = models.measure_attention(student.to(self.acc.device), rows, length)
                table[key] = {"choice": min(times, key=times.get), "seconds": times}
                write_json_atomic(known, table)
            entry = table[key]
            write_json_atomic(path, {**entry, "rows": rows, "length": length, "device": str(self.acc.device)})
            logger.info("attention: %s (forward+backward %s)", entry["choice"],
                        ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in entry["seconds"].items()))
        self.acc.wait_for_everyone()
        return json.loads(path.read_text())["choice"]

    def _initial_student(self):
        """The student before any training: loaded, or derived from the teacher's layers."""
        mc = self.cfg.models
        if mc.student:
            return self._quantized(models.load_model(mc.student, "float32", attn_implementation=self._given_attention(),
                                                     **mc.student_kwargs))
        full = models.load_model(mc.teacher, "float32", **{k: v for k, v in mc.teacher_kwargs.items()
                                                           if k in ("revision", "trust_remote_code")})
        n = mc.student_num_layers
        if mc.student_layers is None and n is None:  # the documented default: half (a VLM's language model's)
            n = max(1, vision.text_config(full.config).num_hidden_layers // 2)
        return self._quantized(models.derive_student(full, layers=mc.student_layers, num_layers=n))

    def _quantized(self, student):
        mc = self.cfg.models
        if mc.student_quantization_bits:
            logger.info("student: weights rounded to %d bits (groups of %d)", mc.student_quantization_bits,
                        mc.student_quantization_group)
            models.quantize_weights(student, mc.student_quantization_bits, mc.student_quantization_group)
        return student

    def load_student(self, stage_model: Path | None):
        """The student after ``stage_model`` (a finished stage's ``model/``), or the initial one."""
        with distributed.replicated_loading(self.acc):
            return self._load_student(stage_model)

    def _load_student(self, stage_model: Path | None):
        mc = self.cfg.models
        kwargs = {"attn_implementation": self.attention}
        freeze = models.freeze_vision_tower if mc.freeze_vision_tower else (lambda model: model)
        if stage_model is not None and not mc.lora:
            return freeze(models.load_model(str(stage_model), mc.dtype, **kwargs))
        base = models.load_model(str(self.dir / "student-init"), mc.dtype, **kwargs)
        if not mc.lora:
            return freeze(base)
        lora = (mc.lora_r, mc.lora_alpha, mc.lora_dropout, mc.lora_target_modules, mc.freeze_vision_tower)
        if stage_model is None:
            return models.add_lora(base, *lora)
        from peft import PeftModel

        if mc.lora_rounds == "carry":  # one adapter trained on through every stage
            return PeftModel.from_pretrained(base, str(stage_model), is_trainable=True)
        # fresh (as released): every finished stage's adapter merged in turn, then a new adapter
        for adapter in self._stages_up_to(stage_model):
            base = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        return models.add_lora(base, *lora)

    # stages -----------------------------------------------------------------------------------

    def round_seed(self, round_index: int) -> int:
        """The sampling seed of round ``round_index``: every round samples afresh (round 1 keeps
        train.seed), and a resumed round samples what it would have."""
        return self.cfg.train.seed + 100_003 * (round_index - 1)

    def generate(self, model, out: Path, stage: str, teacher: bool = False, round_index: int = 1) -> list[dict]:
        """Sampled responses of ``model`` (the teacher, or the current student) for the run's
        prompts into ``out`` (all ranks)."""
        return generate_responses(model, self.tokenizer, self.prompts, out, self.cfg.generation,
                                  seed=self.round_seed(round_index), max_prompt_length=self.cfg.data.max_prompt_length,
                                  accelerator=self.acc, desc=stage, role="teacher" if teacher else "student",
                                  source=self.cfg.models.teacher if teacher else None)

    def generate_interleaved(self, student, out: Path, stage: str, round_index: int) -> list[dict]:
        """Speculative KD's responses: the student proposes, the teacher replaces what falls
        outside its top k (loss.skd_top_k)."""
        return generate_responses(student, self.tokenizer, self.prompts, out, self.cfg.generation,
                                  seed=self.round_seed(round_index), max_prompt_length=self.cfg.data.max_prompt_length,
                                  accelerator=self.acc, desc=stage, interleave_with=self.teacher,
                                  top_k=self.cfg.loss.skd_top_k)

    def train_stage(self, student, pairs, stage_dir: Path, loss_cfg: LossConfig, epochs: float, schedule: Schedule,
                    train_cfg=None):
        """One training stage; writes ``stage_dir/model`` and returns the trained student, or None
        under an engine that shards parameters (the next stage reloads it from that directory).
        The top-k cache serves the stages whose loss reads the teacher on chosen rows; the others
        (an SFT warm-up, a DPO alignment) run as they always do."""
        train_cfg = dataclasses.replace(train_cfg or self.cfg.train, epochs=epochs)
        if train_cfg.teacher_topk and topk_unsupported(loss_cfg.name):
            train_cfg = dataclasses.replace(train_cfg, teacher_topk=0)
        trainer = Trainer(
            accelerator=self.acc, student=student, teacher=self.teacher, tokenizer=self.tokenizer, pairs=pairs,
            train_cfg=train_cfg, loss_cfg=loss_cfg, stage_dir=stage_dir,
            vocab=self.vocab, max_prompt_length=self.cfg.data.max_prompt_length, max_length=self.cfg.data.max_length,
            schedule=schedule, stage_seed=self.cfg.train.seed * 1009 + schedule.round_index, topk_dir=self.topk_dir)
        student = trainer.fit(save_to=stage_dir / "model")
        if self.main:
            remove_checkpoint(stage_dir)  # the stage is finished and saved: optimiser state is dead weight
        self.acc.wait_for_everyone()
        return None if distributed.shards_parameters(self.acc) else student

    def save_final(self, student, config_yaml: str) -> Path:
        """``RUN/final``: the student (LoRA merged), its tokenizer and the config."""
        final = self.dir / "final"
        if self.main:
            models.save_model(student, self.tokenizer, final, config_yaml)
        self.acc.wait_for_everyone()
        return final

    def _sft_pairs(self, teacher_rows: list[dict]) -> tuple[list[dict], str]:
        """The warm-up's pairs: ground-truth responses when every prompt carries one (the
        paper's SFT), else the teacher's (SeqKD); and which of the two."""
        source = self.cfg.data.sft_on
        has_truth = all(p.get("response") for p in self.prompts)
        if source == "ground_truth" and not has_truth:
            missing = sum(not p.get("response") for p in self.prompts)
            raise DataError(f"data.sft_on ground_truth: {missing} prompts carry no response "
                            "(set data.response_field or end their messages with the assistant's turn)")
        if source == "ground_truth" or (source == "auto" and has_truth):
            rows = [{"id": p["id"], "response": p["response"], "finish_reason": "stop"} for p in self.prompts]
            source = "ground_truth"
        else:
            rows, source = teacher_rows, "teacher"
        pairs, _ = make_pairs(self.prompts, rows, [dict(t, response="") for t in rows])
        return pairs, source

    def execute(self) -> Path:
        """Run (or continue) every stage; returns the run directory."""
        cfg = self.cfg
        status = self.dir / "status.json"
        was_finished = status.exists() and json.loads(status.read_text()).get("finished") is True
        fresh_lora = cfg.models.lora and cfg.models.lora_rounds == "fresh"
        teacher_rows = self.generate(self.teacher, self.dir / "round-1" / "teacher.jsonl", "round-1/teacher", True)
        student, previous = None, None
        if cfg.sft_epochs > 0:
            sft_dir = self.dir / "sft"
            if not (sft_dir / "model").exists():
                pairs, source = self._sft_pairs(teacher_rows)
                logger.info("sft: warm-up on %s responses", source.replace("_", "-"))
                if self.main:
                    write_json_atomic(sft_dir / "sft_source.json", {"responses": source}, indent=None)
                student = self.train_stage(self.load_student(None), pairs, sft_dir,
                                           dataclasses.replace(cfg.loss, name="sft"), cfg.sft_epochs,
                                           Schedule(round_index=0))
            previous = sft_dir / "model"

        steps_per_round = num_steps(len(self.prompts), cfg.train, self.acc.num_processes)
        for k in range(1, cfg.rounds + 1):
            rdir = self.dir / f"round-{k}"
            if (rdir / "model").exists():
                student, previous = None, rdir / "model"
                continue
            if student is None or fresh_lora:  # fresh adapters: a new one on the merged model
                student = self.load_student(previous)
            if k > 1 and cfg.generation.teacher_per_round:
                teacher_rows = self.generate(self.teacher, rdir / "teacher.jsonl", f"round-{k}/teacher", True, k)
            if cfg.loss.name == "skd":
                student_rows = self.generate_interleaved(student, rdir / "student.jsonl", f"round-{k}/student", k)
            elif "rejected" in LOSSES[cfg.loss.name].rows:
                student_rows = self.generate(student, rdir / "student.jsonl", f"round-{k}/student", False, k)
            else:  # sft, seqkd, kd never read student responses: do not sample them
                student_rows = [dict(t, response="", finish_reason="length") for t in teacher_rows]
            pairs, missing = make_pairs(self.prompts, teacher_rows, student_rows)
            if missing:
                logger.warning("round %d: %d prompts lack a teacher or student response", k, missing)
            if self.main:
                write_pairs(rdir / "pairs.jsonl", pairs)
            self.acc.wait_for_everyone()
            schedule = Schedule(round_index=k, step_offset=(k - 1) * steps_per_round,
                                total_steps=steps_per_round * cfg.rounds, rounds=cfg.rounds)
            student = self.train_stage(student, pairs, rdir, cfg.loss, cfg.train.epochs, schedule)
            previous = rdir / "model"

        if cfg.align.pairs:
            student, previous = self._align(student, previous)
        rebuilt = self._final_is_stale(previous)
        if rebuilt:
            if student is None:
                student = self.load_student(previous)
            self.save_final(student, to_yaml(cfg))
        if self.main:
            # said in every case: a run without evaluation otherwise ends without naming its model
            logger.info("%s%s", "already finished, nothing to redo: " if was_finished and not rebuilt else "",
                        f"the final model is {self.dir / 'final'}")
            write_json_atomic(self.dir / "status.json", {"finished": True, "rounds": cfg.rounds}, indent=None)
        if cfg.eval.prompts:
            self.evaluate()
        if self.main:
            write_model_card(self.dir)  # with the evaluation table when there is one
            if cfg.hub.push:
                if not cfg.hub.model_id:
                    raise ConfigError("hub.push needs hub.model_id (user/name)")
                push(self.dir, cfg.hub.model_id, private=cfg.hub.private)
        self.acc.end_training()
        return self.dir

    def _align(self, student, previous: Path | None):
        """The alignment stage (RUN/align): ``align.loss`` (DPO) on ``align.pairs`` from the
        distilled student, the reference being that student frozen; final/ is the aligned one."""
        stage = self.dir / "align"
        if (stage / "model").exists():
            return None, stage / "model"
        a = self.cfg.align
        if student is None or (self.cfg.models.lora and self.cfg.models.lora_rounds == "fresh"):
            student = self.load_student(previous)
        pairs = load_pairs(a.pairs)
        loss = dataclasses.replace(self.cfg.loss, name=a.loss, dpo_beta=a.dpo_beta)
        train_cfg = self.cfg.train if a.lr is None else dataclasses.replace(self.cfg.train, lr=a.lr)
        logger.info("align: %s on %d pairs from %s", a.loss, len(pairs), a.pairs)
        student = self.train_stage(student, pairs, stage, loss, a.epochs, Schedule(round_index=0), train_cfg)
        return student, stage / "model"

    def _stages_up_to(self, stage_model: Path) -> list[Path]:
        """The finished stages' model directories in training order, up to ``stage_model``."""
        order = [self.dir / "sft" / "model"] + [self.dir / f"round-{k}" / "model" for k in range(1, self.cfg.rounds + 1)]
        order.append(self.dir / "align" / "model")
        chain = [p for p in order if p.exists()]
        return chain[: chain.index(stage_model) + 1] if stage_model in chain else chain

    def _final_is_stale(self, last_stage: Path | None) -> bool:
        """``final/`` is rebuilt when missing or older than the last stage's model (a finished run
        continued with more rounds)."""
        final = self.dir / "final" / "config.json"
        if not final.exists():
            return True
        if last_stage is None or not last_stage.exists():
            return False
        return max(p.stat().st_mtime_ns for p in last_stage.iterdir()) > final.stat().st_mtime_ns

    def evaluate(self) -> dict:
        """Teacher, SFT student (if the run had a warm-up) and distilled student on the held-out
        prompts: RUN/eval/{results.json, report.md, metrics.png}; returns the report."""
        out_dir = self.dir / "eval"
        candidates = {"teacher": None}
        if self.cfg.eval.include_initial:
            candidates["student_init"] = self.dir / "student-init"
        if (self.dir / "sft" / "model").exists():
            candidates["student_sft"] = self.dir / "sft" / "model"
        candidates["student"] = self.dir / "final"
        results = evaluate_models(candidates, teacher=self.teacher, teacher_source=self.cfg.models.teacher,
                                  tokenizer=self.tokenizer, vocab=self.vocab,
                                  eval_cfg=self.cfg.eval, generation=self.cfg.generation, out_dir=out_dir,
                                  accelerator=self.acc, seed=self.cfg.train.seed,
                                  max_prompt_length=self.cfg.data.max_prompt_length)
        report = {"models": results, "prompts": self.cfg.eval.prompts, "n_prompts": results["teacher"]["n"]}
        if self.main:
            table = write_held_out(report, out_dir, "report.md", f"Evaluation of {self.dir}",
                                   "held-out prompts (ROUGE-L higher, KL lower is better)")
            print(f"\nevaluation on {report['n_prompts']} held-out prompts ({out_dir}):\n{table}", flush=True)
        return report


def run(cfg: RunConfig, force: bool = False) -> Path:
    """Run (or continue) the whole pipeline, evaluating at the end when ``cfg.eval.prompts`` is
    set; returns the run directory. ``force``: continue a directory whose saved config differs."""
    check_trains_something(cfg)
    return Run(cfg, force=force).execute()


def train_stage(cfg: TrainStageConfig, force: bool = False) -> Path:
    """``distillm2 train``: one stage of ``cfg.loss`` on the pairs file ``cfg.pairs``; the student
    lands in ``OUTPUT/final`` (returned). Resumable like a run."""
    if not cfg.pairs:
        raise DataError("train: set `pairs:` to a pairs JSONL file ({id, prompt, chosen, rejected})")
    pairs = load_pairs(cfg.pairs)
    run_cfg = RunConfig(output_dir=cfg.output_dir, rounds=1, models=cfg.models, data=cfg.data,
                        train=cfg.train, loss=cfg.loss)
    r = Run(run_cfg, prompts=[{"id": p["id"], "messages": p["prompt"]} for p in pairs], force=force)
    stage = r.dir / "train"
    student = None
    if not (stage / "model").exists():
        student = r.train_stage(r.load_student(None), pairs, stage, cfg.loss, cfg.train.epochs, Schedule())
    if student is None:
        student = r.load_student(stage / "model")
    final = r.save_final(student, to_yaml(cfg))
    if r.main:
        write_model_card(r.dir)
    return final
