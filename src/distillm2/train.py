"""One explicit training loop on accelerate (DESIGN.md §5).

setup (encode pairs, plan steps, optimiser, scheduler, resume) -> for each optimiser step: its
micro-batches of k pairs as up to 2k rows -> student forward -> teacher forward under no_grad ->
loss -> backward -> clip -> step -> log -> maybe checkpoint.

The data plan is global and deterministic (a permutation seeded by seed and stage), so every
process knows how many pairs and tokens the whole step holds: each micro-batch's loss is its sum
divided by that global count, which makes gradient accumulation and any number of processes give
the update of one large batch. The last global step may be short; with several processes the
plan is padded by wrapping around so that every rank runs the same number of micro-batches.

Checkpoints (``accelerator.save_state`` + ``state.json``) are written to a temporary directory
and renamed; resuming restores model, optimiser, scheduler and RNG states and skips the steps
already taken, so a resumed stage equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distillm2.config import LossConfig, TrainConfig
from distillm2.data import TruncationStats, collate, encode, write_text_atomic
from distillm2.losses import (
    LOSSES,
    adaptive_alpha,
    beta_schedule,
    distillation_loss,
    sequence_mean,
    token_cross_entropy,
)
from distillm2.progress import logger, progress_bar


@dataclass
class Schedule:
    """Where this stage sits in the run, for the beta schedule and the curriculum."""

    round_index: int = 1  # 1-based DistiLLM-2 round; the curriculum starts at round 2
    step_offset: int = 0  # optimiser steps of earlier distillation stages
    total_steps: int | None = None  # of all distillation stages (None: this stage only)


def plan_steps(num_pairs: int, cfg: TrainConfig, world: int, stage_seed: int) -> list[list[list[int]]]:
    """steps[s][m] = pair indices of micro-batch m of step s, for all ranks together (rank r takes
    ``[r * batch_size : (r + 1) * batch_size]``)."""
    total = max(1, math.ceil(cfg.epochs * num_pairs))
    gen = torch.Generator().manual_seed(stage_seed)
    order: list[int] = []
    while len(order) < total:
        order += torch.randperm(num_pairs, generator=gen).tolist()
    order = order[:total]
    micro = cfg.batch_size * world
    if world > 1 and len(order) % micro:
        order += order[: micro - len(order) % micro]  # every rank gets a full micro-batch
    micro_batches = [order[i : i + micro] for i in range(0, len(order), micro)]
    return [micro_batches[i : i + cfg.grad_accum] for i in range(0, len(micro_batches), cfg.grad_accum)]


def num_steps(num_pairs: int, cfg: TrainConfig, world: int = 1) -> int:
    return len(plan_steps(num_pairs, cfg, world, 0))


def _encode_pairs(pairs, tokenizer, rows_needed, max_prompt_length, max_length):
    stats = TruncationStats()
    encoded = []
    for pair in pairs:
        item = {}
        for which in rows_needed:
            item[which] = encode(tokenizer, pair["prompt"], pair[which],
                                 bool(pair.get(f"{which}_finished", True)),
                                 max_prompt_length, max_length, stats)
        encoded.append(item)
    return encoded, stats


def _forward_logits(model, batch, vocab):
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, logits_to_keep=batch.keep, use_cache=False)
    return out.logits[..., :vocab]  # heads wider than the tokenizer: padding is never trained


def _mean_logprob(logits, labels, mask):
    """Mean token log-probability of each row's response, no gradient. ``-> [R]``"""
    with torch.no_grad():
        return -sequence_mean(token_cross_entropy(logits.detach(), labels, mask), mask)


class Trainer:
    """Trains ``student`` for one stage (an SFT warm-up or one DistiLLM-2 round) on ``pairs``."""

    def __init__(self, accelerator, student, teacher, tokenizer, pairs, train_cfg: TrainConfig,
                 loss_cfg: LossConfig, stage_dir, vocab: int, max_prompt_length=512,
                 max_length=1024, schedule: Schedule | None = None, stage_seed: int = 0,
                 crash_after_steps: int | None = None):
        self.acc, self.cfg, self.loss_cfg = accelerator, train_cfg, loss_cfg
        torch.manual_seed(stage_seed)  # dropout (LoRA) does not depend on what ran before
        self.stage_dir = Path(stage_dir)
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer, self.vocab = tokenizer, vocab
        self.schedule = schedule or Schedule()
        self.crash_after_steps = crash_after_steps
        self.spec = LOSSES[loss_cfg.name]
        self.encoded, stats = _encode_pairs(pairs, tokenizer, self.spec.rows, max_prompt_length, max_length)
        if accelerator.is_main_process:  # one writer: ranks share the file system
            if stats.prompts or stats.responses:
                logger.warning("%s: %s", self.stage_dir.name, stats.report())
            write_text_atomic(self.stage_dir / "truncation.json", json.dumps(stats.__dict__))
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.steps = plan_steps(len(pairs), train_cfg, self.world, stage_seed)
        self.curriculum = (loss_cfg.name == "distillm2" and loss_cfg.curriculum
                           and self.schedule.round_index >= 2)

        if train_cfg.gradient_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(student, "enable_input_require_grads"):
                student.enable_input_require_grads()
        student.train()
        params = [p for p in student.parameters() if p.requires_grad]
        if train_cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, betas=tuple(train_cfg.adam_betas),
                                          weight_decay=train_cfg.weight_decay)
        from accelerate.utils import DistributedType

        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        if self.deepspeed:  # no dataloader is prepared, so DeepSpeed's "auto" sizes are set here
            ds = accelerator.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = train_cfg.batch_size
            ds["gradient_accumulation_steps"] = train_cfg.grad_accum
            ds["gradient_clipping"] = train_cfg.max_grad_norm
        self.student, self.optimizer = accelerator.prepare(student, optimizer)
        # The scheduler is stepped by hand, once per optimiser step (accelerate's wrapper would
        # step it once per process); its state is kept in state.json.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_lambda(len(self.steps)))
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            params = next(teacher.parameters(), None)
            if isinstance(teacher, torch.nn.Module) and params is not None and params.device != accelerator.device \
                    and not hasattr(teacher, "_fsdp_wrapped_module"):
                teacher.to(accelerator.device)  # callers that did not place it (pipeline.place_teacher does)
        self.state = {"step": 0, "finished": False, "anchor_chosen": None, "anchor_rejected": None}
        self._resume()
        if accelerator.is_main_process:
            info = {"num_processes": self.world, "distributed_type": str(accelerator.distributed_type),
                    "mixed_precision": accelerator.mixed_precision, "steps": len(self.steps),
                    "pairs": len(pairs), "loss": loss_cfg.name, "curriculum": self.curriculum}
            write_text_atomic(self.stage_dir / "train_info.json", json.dumps(info, indent=2))

    def _lr_lambda(self, total):
        warmup = int(self.cfg.warmup_ratio * total)

        def factor(step):
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if self.cfg.lr_schedule == "constant":
                return 1.0
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        return factor

    # checkpoints ----------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.stage_dir / "checkpoint"

    def _resume(self):
        state_file = self.checkpoint_dir / "state.json"
        if not state_file.exists():
            return
        self.state = json.loads(state_file.read_text())
        self.acc.load_state(str(self.checkpoint_dir))
        self.scheduler.load_state_dict(self.state.pop("scheduler"))
        metrics = self.stage_dir / "metrics.jsonl"
        if self.acc.is_main_process and metrics.exists():  # drop lines logged after the checkpoint
            lines = [ln for ln in metrics.read_text().splitlines(keepends=True)
                     if ln.endswith("\n") and json.loads(ln)["step"] <= self.state["step"]]
            write_text_atomic(metrics, "".join(lines))
        logger.info("%s: resumed at step %d of %d", self.stage_dir.name, self.state["step"], len(self.steps))

    def save_checkpoint(self):
        tmp = self.stage_dir / "checkpoint.tmp"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            state = dict(self.state, scheduler=self.scheduler.state_dict())
            write_text_atomic(tmp / "state.json", json.dumps(state))
            old = self.stage_dir / "checkpoint.old"
            shutil.rmtree(old, ignore_errors=True)
            if self.checkpoint_dir.exists():
                self.checkpoint_dir.rename(old)
            tmp.rename(self.checkpoint_dir)
            shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    # one step -------------------------------------------------------------------------------

    def _rows(self, indices):
        """This rank's pairs of a micro-batch as one Batch: chosen rows first, then rejected."""
        mine = indices[self.rank * self.cfg.batch_size : (self.rank + 1) * self.cfg.batch_size]
        rows = [self.encoded[i][which] for which in self.spec.rows for i in mine]
        return len(mine), collate(rows, self.tokenizer.pad_token_id).to(self.acc.device)

    def _logits(self, batch):
        with self.acc.autocast():
            student_logits = _forward_logits(self.student, batch, self.vocab)
        teacher_logits = None
        if self.spec.needs_teacher:
            with torch.no_grad():
                teacher_logits = _forward_logits(self.teacher, batch, self.vocab)
        return student_logits, teacher_logits

    def _gaps(self, k, batch, student_logits, teacher_logits):
        """Per-pair gaps of the curriculum: exp(lp) - exp(lq) on chosen rows, reversed on rejected."""
        lq = _mean_logprob(student_logits, batch.labels, batch.mask).exp()
        lp = _mean_logprob(teacher_logits, batch.labels, batch.mask).exp()
        return lp[:k] - lq[:k], lq[k:] - lp[k:]

    def _measure_anchor(self, step_batches):
        """The round's anchors: mean gaps over the first step's pairs (all ranks), before training."""
        sums = torch.zeros(3, device=self.acc.device)
        with torch.no_grad():
            for indices in step_batches:
                k, batch = self._rows(indices)
                student_logits, teacher_logits = self._logits(batch)
                gc, gr = self._gaps(k, batch, student_logits, teacher_logits)
                sums += torch.stack([gc.sum(), gr.sum(), torch.tensor(float(k), device=sums.device)])
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

    def _loss(self, k, batch, student_logits, teacher_logits, beta, denom, log):
        lc = self.loss_cfg
        kw = {"temperature": lc.temperature, "beta": beta, "jsd_beta": lc.jsd_beta,
              "alpha_chosen": lc.alpha0, "alpha_rejected": lc.alpha0}
        if self.curriculum:
            gc, gr = self._gaps(k, batch, student_logits, teacher_logits)
            ac_kw = {"alpha0": lc.alpha0, "alpha_min": lc.alpha_min, "alpha_max": lc.alpha_max}
            kw["alpha_chosen"] = adaptive_alpha(gc, self.state["anchor_chosen"], **ac_kw).to(student_logits.device)
            kw["alpha_rejected"] = adaptive_alpha(gr, self.state["anchor_rejected"], **ac_kw).to(student_logits.device)
        offset = 0
        for which in self.spec.rows:
            s = slice(offset, offset + k)
            kw[f"student_{which}"] = student_logits[s]
            kw[f"mask_{which}"] = batch.mask[s]
            if which == "chosen":
                kw["labels_chosen"] = batch.labels[s]
            if teacher_logits is not None:
                kw[f"teacher_{which}"] = teacher_logits[s]
            offset += k
        out = distillation_loss(lc.name, **kw)
        if self.cfg.reduction == "sequence":
            loss = out.per_pair.sum() / denom
        else:
            loss = sum(out.token_sums[w] / max(denom[w], 1) for w in self.spec.rows)
        log["loss_sum"] += float(out.per_pair.detach().sum())
        log["pairs"] += k
        for name, value in out.terms.items():
            log.setdefault(f"{name}_sum", 0.0)
            log[f"{name}_sum"] += float(value.detach().sum())
        for which in ("chosen", "rejected"):
            alpha = kw[f"alpha_{which}"]
            if isinstance(alpha, torch.Tensor):
                log.setdefault(f"alpha_{which}", []).extend(alpha.tolist())
        # DDP averages gradients over processes; undo it so that the sum over the step is exact.
        # DeepSpeed also divides by its accumulation steps; undo that too.
        return loss * self.world * (self.cfg.grad_accum if self.deepspeed else 1)

    def fit(self):
        """Run the remaining steps; returns the unwrapped student."""
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
                beta = beta_schedule(progress, self.loss_cfg.beta_schedule, beta0=self.loss_cfg.beta0,
                                     beta_max=self.loss_cfg.beta_max, ramp=self.loss_cfg.beta_ramp)
                denom = self._step_denominator(step_batches)
                log = {"loss_sum": 0.0, "pairs": 0, "tokens": 0}
                t0 = time.perf_counter()
                for m, indices in enumerate(step_batches):
                    k, batch = self._rows(indices)
                    log["tokens"] += int(batch.attention_mask.sum())
                    sync = m == len(step_batches) - 1
                    ctx = acc.no_sync(self.student) if not sync else contextlib.nullcontext()
                    with ctx:
                        student_logits, teacher_logits = self._logits(batch)
                        loss = self._loss(k, batch, student_logits, teacher_logits, beta, denom, log)
                        acc.backward(loss)
                    del student_logits, teacher_logits, loss
                grad_norm = acc.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                lr = self.scheduler.get_last_lr()[0]
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state["step"] = step + 1
                self._log(step + 1, log, beta, lr, grad_norm, time.perf_counter() - t0, metrics_path, bar)
                last = step + 1 == len(self.steps)
                if last:
                    self.state["finished"] = True
                if last or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
                    self.save_checkpoint()
                if self.crash_after_steps is not None and step + 1 >= self.crash_after_steps:
                    from distillm2.generate import _crash_for_test

                    _crash_for_test()
        if not self.state["finished"]:
            self.state["finished"] = True
            self.save_checkpoint()
        student = acc.unwrap_model(self.student)
        acc.free_memory()  # forget this stage's model and optimiser: the next stage prepares anew
        return student

    def _log(self, step, log, beta, lr, grad_norm, seconds, path, bar):
        acc = self.acc
        keys = sorted(k for k in log if k.endswith("_sum") or k in ("pairs", "tokens"))
        totals = acc.reduce(torch.tensor([float(log[k]) for k in keys], device=acc.device), "sum")
        agg = dict(zip(keys, totals.tolist()))
        pairs = max(agg["pairs"], 1.0)
        record = {"step": step, "loss": agg["loss_sum"] / pairs}
        for k in keys:
            if k.endswith("_sum") and k != "loss_sum":
                record[k[:-4]] = agg[k] / pairs
        for which in ("chosen", "rejected"):
            values = log.get(f"alpha_{which}")
            if values:
                gathered = acc.gather(torch.tensor(values, device=acc.device))
                record[f"alpha_{which}_mean"] = float(gathered.mean())
                record[f"alpha_{which}_min"] = float(gathered.min())
                record[f"alpha_{which}_max"] = float(gathered.max())
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)  # None under DeepSpeed
        record.update({"beta": beta, "lr": lr, "grad_norm": grad_norm, "world_size": self.world,
                       "tokens_per_s": agg["tokens"] / max(seconds, 1e-9), "step_s": seconds})
        if acc.is_main_process:
            if step % max(1, self.cfg.log_every) == 0 or step == len(self.steps):
                with open(path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")

