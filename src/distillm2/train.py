"""One explicit training loop on accelerate.

setup (encode pairs, plan steps, optimiser, scheduler, resume) -> for each optimiser step: its
micro-batches of k pairs as up to 2k rows -> student forward -> teacher forward under no_grad ->
loss -> backward -> clip -> step -> log -> maybe checkpoint.

The data plan is global and deterministic (a permutation seeded by seed and stage), so every
process knows how many pairs and tokens the whole step holds: each micro-batch's loss is its sum
divided by that global count, which makes gradient accumulation and any number of processes give
the update of one large batch. The last global step may be short; with several processes the
plan is padded by wrapping around so that every rank runs the same number of micro-batches.
The engine (DDP, DeepSpeed, FSDP) is :mod:`distillm2.distributed`'s business, checkpoints are
:mod:`distillm2.checkpoint`'s; a resumed stage equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distillm2 import checkpoint, distributed, divergence, vision
from distillm2.config import LossConfig, TrainConfig
from distillm2.data import Batch, collate, encode_pairs, sub_batch
from distillm2.errors import ConfigError, DivergenceError, NonFiniteError
from distillm2.faults import maybe_crash, nan_at
from distillm2.files import write_json_atomic
from distillm2.fused_loop import fused_gaps, fused_loss, hidden_batch, response_hidden
from distillm2.losses import (
    LOSSES,
    LossOutput,
    LossParams,
    adaptive_alpha,
    beta_schedule,
    curriculum_gaps,
    stacked_pair_loss,
)
from distillm2.models import response_logits
from distillm2.progress import logger, progress_bar
from distillm2.teacher_cache import ChosenTopK, check_topk


@dataclass
class Schedule:
    """Where this stage sits in the run, for the beta schedule and the curriculum."""

    round_index: int = 1  # 1-based DistiLLM-2 round; the curriculum starts at round 2
    step_offset: int = 0  # optimiser steps of earlier distillation stages
    total_steps: int | None = None  # of all distillation stages (None: this stage only)
    rounds: int = 1  # of the run


def plan_steps(num_pairs: int, cfg: TrainConfig, world: int, stage_seed: int,
               lengths: list[int] | None = None) -> list[list[list[int]]]:
    """steps[s][m] = pair indices of micro-batch m of step s, for all ranks together (rank r takes
    ``[r * batch_size : (r + 1) * batch_size]``). With ``cfg.group_by_length`` and the pairs'
    ``lengths``, the shuffled order is sorted by length within windows of 16 micro-batches, so
    micro-batches hold pairs of similar length (less padding) while the plan stays a pure
    function of the seed."""
    total = max(1, math.ceil(cfg.epochs * num_pairs))
    gen = torch.Generator().manual_seed(stage_seed)
    order: list[int] = []
    while len(order) < total:
        order += torch.randperm(num_pairs, generator=gen).tolist()
    order = order[:total]
    micro = cfg.batch_size * world
    if cfg.group_by_length and lengths is not None:
        window = micro * 16
        order = [i for w in range(0, len(order), window)
                 for i in sorted(order[w : w + window], key=lambda i: -lengths[i])]
    if world > 1 and len(order) % micro:
        order += order[: micro - len(order) % micro]  # every rank gets a full micro-batch
    micro_batches = [order[i : i + micro] for i in range(0, len(order), micro)]
    return [micro_batches[i : i + cfg.grad_accum] for i in range(0, len(micro_batches), cfg.grad_accum)]


def num_steps(num_pairs: int, cfg: TrainConfig, world: int = 1) -> int:
    """Optimiser steps of one stage over ``num_pairs`` pairs."""
    return len(plan_steps(num_pairs, cfg, world, 0))


def make_optimizer(params, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW (the paper; ``fused``: torch's single-kernel implementation) or plain SGD."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay,
                             fused=fused or None)


def lr_factor(cfg: TrainConfig, total: int):
    """The LR multiplier per optimiser step: linear warm-up, then cosine (or constant)."""
    warmup = int(cfg.warmup_ratio * total)

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


@dataclass
class MicroBatch:
    """This rank's share of one micro-batch: ``pairs`` pairs laid out as rows, the rows of each
    kind in ``rows`` order (chosen rows first, then rejected)."""

    pairs: int
    rows: tuple[str, ...]
    batch: Batch
    indices: tuple[int, ...] = ()  # the pairs', in this rank's order

    def part(self, which: str) -> slice:
        """The row slice of one row kind."""
        start = self.rows.index(which) * self.pairs
        return slice(start, start + self.pairs)


@dataclass
class StepMetrics:
    """Sums over one optimiser step on this rank; :meth:`record` reduces them over ranks."""

    sums: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "pairs": 0.0, "tokens": 0.0})
    alphas: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        """Add ``value`` to the sum called ``name``."""
        self.sums[name] = self.sums.get(name, 0.0) + float(value)

    def record(self, accelerator) -> dict:
        """Means per pair over all ranks, and min / mean / max of the per-pair alphas."""
        keys = sorted(self.sums)
        totals = accelerator.reduce(torch.tensor([self.sums[k] for k in keys], device=accelerator.device), "sum")
        agg = dict(zip(keys, totals.tolist()))
        pairs = max(agg.pop("pairs"), 1.0)
        tokens = agg.pop("tokens")
        out = {name: value / pairs for name, value in agg.items()}
        for which, values in self.alphas.items():
            gathered = accelerator.gather(torch.tensor(values, device=accelerator.device))
            out[f"alpha_{which}_mean"] = float(gathered.mean())
            out[f"alpha_{which}_min"] = float(gathered.min())
            out[f"alpha_{which}_max"] = float(gathered.max())
        return {"tokens": tokens, **out}


class Trainer:
    """Trains ``student`` for one stage (an SFT warm-up or one DistiLLM-2 round) on ``pairs``."""

    def __init__(self, *, accelerator, student, teacher, tokenizer, pairs: list[dict], train_cfg: TrainConfig,
                 loss_cfg: LossConfig, stage_dir: str | Path, vocab: int, max_prompt_length: int = 512,
                 max_length: int = 1024, schedule: Schedule | None = None, stage_seed: int = 0,
                 topk_dir: str | Path | None = None):
        self.acc, self.cfg, self.loss_cfg = accelerator, train_cfg, loss_cfg
        torch.manual_seed(stage_seed)  # dropout (LoRA) does not depend on what ran before
        self.stage_dir = Path(stage_dir)
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer, self.vocab = tokenizer, vocab
        self.schedule = schedule or Schedule()
        self.spec = LOSSES[loss_cfg.name]
        self.params = LossParams(temperature=loss_cfg.temperature, jsd_beta=loss_cfg.jsd_beta,
                                 dpo_beta=loss_cfg.dpo_beta)
        self.fused = train_cfg.fused_loss
        if self.fused and (loss_cfg.name != "distillm2" or train_cfg.reduction != "sequence"
                           or accelerator.num_processes > 1):
            raise ConfigError("train.fused_loss: the fused path computes the distillm2 loss with sequence reduction "
                              "on one process")
        check_topk(train_cfg.teacher_topk, loss_cfg.name, self.fused, accelerator.num_processes)
        vision.check_training(train_cfg, pairs)
        self.pair_ids = [p.get("id", str(i)) for i, p in enumerate(pairs)]
        self.encoded, stats = encode_pairs(pairs, tokenizer, self.spec.rows, max_prompt_length, max_length)
        if accelerator.is_main_process:  # one writer: ranks share the file system
            if stats.prompts or stats.responses:
                logger.warning("%s: %s", self.stage_dir.name, stats.report())
            write_json_atomic(self.stage_dir / "truncation.json", stats.__dict__, indent=None)
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        lengths = [max(len(r.prompt_ids) + len(r.response_ids) for r in item.values()) for item in self.encoded]
        self.steps = plan_steps(len(pairs), train_cfg, self.world, stage_seed, lengths)
        self.curriculum = (loss_cfg.name == "distillm2" and loss_cfg.curriculum
                           and self.schedule.round_index >= 2)

        if train_cfg.gradient_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(student, "enable_input_require_grads"):
                student.enable_input_require_grads()
        if self.spec.reference == "student":  # DPO: the student as it starts the stage, frozen (before
            # an engine may shard it, and before a resumed checkpoint replaces its weights)
            teacher = copy.deepcopy(student)
            teacher = teacher.merge_and_unload() if hasattr(teacher, "merge_and_unload") else teacher
            teacher.eval().requires_grad_(False)
        student.train()
        trainable = [p for p in student.parameters() if p.requires_grad]
        fused = train_cfg.fused_optimizer and distributed.engine(accelerator) == "ddp" and all(
            p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in trainable)
        optimizer = make_optimizer(trainable, train_cfg, fused=fused)
        distributed.configure_deepspeed(accelerator, train_cfg)
        self.student, self.optimizer = accelerator.prepare(student, optimizer)
        self.loss_scale = distributed.loss_scale(accelerator, train_cfg)
        # The scheduler is stepped by hand, once per optimiser step (accelerate's wrapper would
        # step it once per process); its state is kept in the checkpoint's state.json.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(train_cfg, len(self.steps)))
        self.teacher = None
        if self.spec.needs_teacher:
            self.teacher = distributed.place_teacher(accelerator, teacher)
        self.topk = None  # train.teacher_topk: the chosen rows' teacher, cached (teacher_cache.py)
        if train_cfg.teacher_topk:
            self.topk = ChosenTopK(
                Path(topk_dir) if topk_dir is not None else self.stage_dir.parent / "teacher-topk", self.teacher,
                [item["chosen"] for item in self.encoded], k=train_cfg.teacher_topk,
                temperature=loss_cfg.temperature, vocab=vocab, pad_id=tokenizer.pad_token_id,
                batch_rows=2 * train_cfg.batch_size, device=accelerator.device, stage=self.stage_dir.name)
        self.state = {"step": 0, "finished": False, "anchor_chosen": None, "anchor_rejected": None}
        resumed = checkpoint.load_checkpoint(accelerator, self.stage_dir, self.scheduler)
        if resumed is not None:
            self.state = resumed
            logger.info("%s: resumed at step %d of %d", self.stage_dir.name, self.state["step"], len(self.steps))
        else:
            checkpoint.cut_metrics(accelerator, self.stage_dir, 0)
        if accelerator.is_main_process:
            write_json_atomic(self.stage_dir / "train_info.json", {
                "num_processes": self.world, "distributed_type": str(accelerator.distributed_type),
                "mixed_precision": accelerator.mixed_precision, "steps": len(self.steps),
                "pairs": len(pairs), "loss": loss_cfg.name, "curriculum": self.curriculum})

    # one step -------------------------------------------------------------------------------

    def _micro_batch(self, indices: list[int]) -> MicroBatch:
        mine = indices[self.rank * self.cfg.batch_size : (self.rank + 1) * self.cfg.batch_size]
        rows = [self.encoded[i][which] for which in self.spec.rows for i in mine]
        batch = collate(rows, self.tokenizer.pad_token_id).to(self.acc.device)
        return MicroBatch(len(mine), self.spec.rows, batch, tuple(mine))

    def _logits(self, mb: MicroBatch):
        """Student logits (with grad) and teacher logits of the response positions; on the fused
        path, the rows' hidden states instead (as a HiddenBatch, and None). With the top-k cache
        the teacher's part is ``{"chosen": TopKTeacher, "rejected": logits}``: its forward runs on
        the rejected rows only."""
        forward = response_hidden if self.fused else response_logits
        args = (mb.batch,) if self.fused else (mb.batch, self.vocab)
        # Row kinds of the same pairs share their prompts: run them once (models.response_logits).
        shared = {} if self.fused or len(mb.rows) < 2 else {"shared_prompts": mb.pairs}
        with self.acc.autocast():
            student_out = forward(self.student, *args, **({} if self.cfg.gradient_checkpointing else shared))
        teacher_out = None
        if self.topk is not None:
            teacher_out = {"chosen": self.topk.teacher(list(mb.indices), mb.batch.labels.shape[1], self.acc.device)}
            if "rejected" in mb.rows:
                with torch.no_grad():
                    teacher_out["rejected"] = response_logits(
                        self.teacher, sub_batch(mb.batch, mb.part("rejected")), self.vocab)
        elif self.teacher is not None:
            with torch.no_grad():
                teacher_out = forward(self.teacher, *args, **shared)
        if self.fused:
            return hidden_batch(student_out, teacher_out, mb.batch, self.spec.rows, mb.pairs), None
        return student_out, teacher_out

    def _measure_anchor(self, step_batches) -> None:
        """The round's anchors: mean gaps over the first step's pairs (all ranks), before training."""
        sums = torch.zeros(3, device=self.acc.device)
        with torch.no_grad():
            for indices in step_batches:
                mb = self._micro_batch(indices)
                s, t = self._logits(mb)
                gc, gr = self._gaps(mb, s, t)
                sums += torch.stack([gc.sum(), gr.sum(), torch.tensor(float(mb.pairs), device=sums.device)])
        sums = self.acc.reduce(sums, reduction="sum")
        self.state["anchor_chosen"] = float(sums[0] / sums[2])
        self.state["anchor_rejected"] = float(sums[1] / sums[2])
        logger.info("%s: curriculum anchors chosen %.4f rejected %.4f", self.stage_dir.name,
                    self.state["anchor_chosen"], self.state["anchor_rejected"])

    def _step_denominator(self, step_batches):
        """Global count the step's loss is divided by: pairs, or masked tokens per row kind."""
        pairs = sum(len(indices) for indices in step_batches)
        if self.cfg.reduction == "sequence":
            return pairs
        return {which: sum(len(self.encoded[i][which].response_ids) for ind in step_batches for i in ind)
                for which in self.spec.rows}

    def _gaps(self, mb: MicroBatch, student_logits, teacher_logits):
        """The curriculum's per-pair gaps of chosen and rejected rows."""
        if self.fused:
            return fused_gaps(student_logits, self.student, self.teacher, self.vocab, mb.pairs)
        labels, mask = mb.batch.labels, mb.batch.mask
        if not isinstance(teacher_logits, dict):
            return curriculum_gaps(student_logits, teacher_logits, labels, mask, mb.pairs)
        c, r = mb.part("chosen"), mb.part("rejected")  # the top-k cache: one row kind at a time
        gc = curriculum_gaps(student_logits[c], teacher_logits["chosen"], labels[c], mask[c], mb.pairs)[0]
        gr = curriculum_gaps(student_logits[r], teacher_logits["rejected"], labels[r], mask[r], 0)[1]
        return gc, gr

    def _alphas(self, mb: MicroBatch, student_logits, teacher_logits):
        """Per-pair alphas of both row kinds: alpha0, or the curriculum's from round 2."""
        lc = self.loss_cfg
        if not self.curriculum:
            return lc.alpha0, lc.alpha0
        gc, gr = self._gaps(mb, student_logits, teacher_logits)
        bounds = {"alpha0": lc.alpha0, "alpha_min": lc.alpha_min, "alpha_max": lc.alpha_max,
                  "negative_gap": lc.negative_gap}
        device = gc.device
        return (adaptive_alpha(gc, self.state["anchor_chosen"], **bounds).to(device),
                adaptive_alpha(gr, self.state["anchor_rejected"], **bounds).to(device))

    def _loss(self, mb: MicroBatch, student_logits, teacher_logits, beta, denom, metrics: StepMetrics):
        alphas = dict(zip(("chosen", "rejected"), self._alphas(mb, student_logits, teacher_logits)))
        if self.fused:  # student_logits is a HiddenBatch here
            fused = fused_loss(student_logits, self.student, self.teacher, self.vocab, pairs=mb.pairs, alphas=alphas,
                               beta=beta, temperature=self.loss_cfg.temperature)
            per_pair = (1.0 - beta) * fused.skl + beta * fused.srkl
            out = LossOutput(fused.loss, per_pair, {"skl": fused.skl, "srkl": fused.srkl})
            loss = fused.loss * mb.pairs / denom  # the same per-pair sum, divided by the step's pairs
            return self._account(out, loss, mb, alphas, metrics)
        # The row kinds stay stacked: one chunked pass and one gradient buffer for the micro-batch
        # (a dict teacher is the top-k cache, one entry per row kind).
        out = stacked_pair_loss(self.loss_cfg.name, student_logits, teacher_logits, mb.batch.mask,
                                {w: mb.part(w) for w in self.spec.rows}, labels=mb.batch.labels, alphas=alphas,
                                beta=beta, params=self.params)
        if self.cfg.reduction == "sequence":
            loss = out.per_pair.sum() / denom
        else:
            loss = sum(out.token_sums[w] / max(denom[w], 1) for w in self.spec.rows)
        return self._account(out, loss, mb, alphas, metrics)

    def _account(self, out, loss, mb: MicroBatch, alphas: dict, metrics: StepMetrics):
        metrics.add("loss", out.per_pair.detach().sum())
        metrics.add("pairs", mb.pairs)
        for name, value in out.terms.items():
            metrics.add(name, value.detach().sum())
        for which, alpha in alphas.items():
            if isinstance(alpha, torch.Tensor):
                metrics.alphas.setdefault(which, []).extend(alpha.tolist())
        return loss * self.loss_scale

    def fit(self, save_to: str | Path | None = None):
        """Run the remaining steps, save the trained student's full weights to ``save_to`` (all
        ranks take part; only the adapter under LoRA) and return the unwrapped student -- under
        an engine that shards parameters, reload it from ``save_to`` instead of using it."""
        acc, cfg = self.acc, self.cfg
        total_steps = self.schedule.total_steps or len(self.steps)
        metrics_path = self.stage_dir / "metrics.jsonl"
        start_step = self.state["step"]
        with progress_bar(total=len(self.steps), desc=f"train {self.stage_dir.name}", unit="step",
                          disable=not acc.is_main_process, initial=start_step) as bar:
            for step in range(start_step, len(self.steps)):
                step_batches = self.steps[step]
                if self.curriculum and self.state["anchor_chosen"] is None:
                    self._measure_anchor(step_batches)
                progress = min(1.0, (self.schedule.step_offset + step) / max(1, total_steps - 1))
                lc = self.loss_cfg
                beta = beta_schedule(progress, lc.beta_schedule, beta0=lc.beta0, beta_max=lc.beta_max,
                                     ramp=lc.beta_ramp, round_progress=step / max(1, len(self.steps) - 1),
                                     round_index=self.schedule.round_index, rounds=self.schedule.rounds)
                denom = self._step_denominator(step_batches)
                metrics = StepMetrics()
                t0 = time.perf_counter()
                bad_rows: list[str] = []
                for m, indices in enumerate(step_batches):
                    mb = self._micro_batch(indices)
                    metrics.add("tokens", mb.batch.attention_mask.sum())
                    # The last micro-batch of the step ends it: gradients are synchronised
                    # (DDP, FSDP) and, under DeepSpeed, only then does the engine step.
                    sync = m == len(step_batches) - 1
                    acc.sync_gradients = sync
                    with acc.no_sync(self.student) if not sync else contextlib.nullcontext():
                        student_logits, teacher_logits = self._logits(mb)
                        if nan_at(f"{self.stage_dir.name}/train", step + 1, "DISTILLM2_BLOWUP"):
                            student_logits = student_logits * 1e3  # fault injection (tests): finite, exploded
                        loss = self._loss(mb, student_logits, teacher_logits, beta, denom, metrics)
                        # The chunked losses form their gradient during the forward pass and keep
                        # neither model's [R, T, V] logits for the backward one: dropping ours here
                        # frees both before backward allocates the weights' gradients (the step's
                        # peak); autograd still holds whatever another loss needs.
                        del student_logits, teacher_logits
                        if nan_at(f"{self.stage_dir.name}/train", step + 1):
                            loss = loss * float("nan")  # fault injection (tests)
                        if not torch.isfinite(loss):
                            bad_rows += self._rows_of(indices)
                        if distributed.engine(acc) == "deepspeed" and self._any(bool(bad_rows)):
                            # DeepSpeed steps inside its backward: the step cannot be skipped.
                            self._fail(step + 1, metrics, bad_rows, "under DeepSpeed a non-finite step cannot be skipped")
                        acc.backward(loss)
                    del loss
                grad_norm = distributed.grad_norm(acc, self.student, cfg.max_grad_norm)
                finite = not self._any(bool(bad_rows) or not math.isfinite(grad_norm))
                if finite:
                    self.optimizer.step()
                    self.state["nonfinite_in_a_row"] = 0
                elif acc.scaler is not None and not self._any(bool(bad_rows)):
                    # fp16 autocast (a GPU without bf16): the loss is finite but its scaled gradient
                    # overflowed. The scaler's step skips the update and lowers the scale; skipping
                    # it here instead would keep the scale, and every later step would overflow too.
                    self.optimizer.step()
                    self.state["skipped_steps"] = self.state.get("skipped_steps", 0) + 1
                    logger.info("%s: step %d: fp16 gradient overflow, update skipped, loss scale now %g",
                                self.stage_dir.name, step + 1, acc.scaler.get_scale())
                else:  # skipped: no weight or optimiser-state change
                    self.state["nonfinite_in_a_row"] = self.state.get("nonfinite_in_a_row", 0) + 1
                    self.state["skipped_steps"] = self.state.get("skipped_steps", 0) + 1
                    logger.warning("%s: step %d skipped: non-finite loss or gradient norm (rows %s)",
                                   self.stage_dir.name, step + 1, ", ".join(bad_rows[:8]) or "unknown")
                    if self.state["nonfinite_in_a_row"] > cfg.max_nonfinite_steps:
                        self._fail(step + 1, metrics, bad_rows,
                                   f"{self.state['nonfinite_in_a_row']} non-finite steps in a row "
                                   f"(train.max_nonfinite_steps={cfg.max_nonfinite_steps})")
                lr = self.scheduler.get_last_lr()[0]
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state["step"] = step + 1
                metrics.add("skipped", 0.0 if finite else 1.0)
                record = self._log(step + 1, metrics, beta, lr, grad_norm, time.perf_counter() - t0, metrics_path, bar)
                why = divergence.check(self.state, step + 1, record["loss"], grad_norm, cfg.divergence_factor) \
                    if finite else None
                if why:  # before this step's checkpoint: the last one saved is from before the divergence
                    raise DivergenceError(f"{self.stage_dir}: step {step + 1} diverged: {why}. The last checkpoint "
                                          "is intact; lower train.lr (and rerun with --force: the config changed)")
                last = step + 1 == len(self.steps)
                if last:
                    self.state["finished"] = True
                if last or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
                    checkpoint.save_checkpoint(acc, self.stage_dir, self.state, self.scheduler)
                maybe_crash(f"{self.stage_dir.name}/train", step + 1)
        if not self.state["finished"]:
            self.state["finished"] = True
            checkpoint.save_checkpoint(acc, self.stage_dir, self.state, self.scheduler)
        if save_to is not None:
            distributed.save_trained(acc, self.student, save_to, self.tokenizer)
        student = acc.unwrap_model(self.student)
        acc.free_memory()  # forget this stage's model and optimiser: the next stage prepares anew
        return student

    def _rows_of(self, indices) -> list[str]:
        mine = indices[self.rank * self.cfg.batch_size : (self.rank + 1) * self.cfg.batch_size]
        return [self.pair_ids[i] for i in mine]

    def _any(self, flag: bool) -> bool:
        """``flag`` on any rank (every rank must call it: it is a collective)."""
        if self.world == 1:
            return flag
        return bool(self.acc.reduce(torch.tensor([float(flag)], device=self.acc.device), "sum").item() > 0)

    def _fail(self, step: int, metrics: StepMetrics, rows: list[str], why: str):
        terms = {k: round(v / max(metrics.sums.get("pairs", 1.0), 1.0), 4) for k, v in metrics.sums.items()
                 if k not in ("pairs", "tokens")}
        raise NonFiniteError(f"{self.stage_dir}: step {step}: {why}; loss terms (per pair, this rank) {terms}; "
                             f"pairs with a non-finite loss: {', '.join(rows[:16]) or 'none (the gradient was)'}. "
                             f"The last checkpoint is intact; lower train.lr or check these rows.")

    def _log(self, step, metrics: StepMetrics, beta, lr, grad_norm, seconds, path, bar):
        skipped = metrics.sums.pop("skipped", 0.0)
        record = {"step": step, **metrics.record(self.acc)}
        record["skipped"] = int(skipped)
        record["skipped_total"] = int(self.state.get("skipped_steps", 0))
        tokens = record.pop("tokens")
        record.update({"beta": beta, "lr": lr, "grad_norm": grad_norm, "world_size": self.world,
                       "tokens_per_s": tokens / max(seconds, 1e-9), "step_s": seconds})
        if step % max(1, self.cfg.log_every) == 0 or step == len(self.steps):
            if self.acc.is_main_process:
                with open(path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
            # the same values to the experiment trackers (a no-op without train.report_to)
            self.acc.log({f"{self.stage_dir.name}/{k}": v for k, v in record.items()
                          if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}, step=step)
        if self.acc.is_main_process:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        return record
