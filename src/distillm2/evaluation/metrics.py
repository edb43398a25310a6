"""Metrics: ROUGE-L against reference outputs (with a bootstrap interval) and teacher-forced
KL / NLL on teacher responses.

ROUGE-L (``rouge-score``, F-measure, stemming on) compares greedy outputs with references -- by
default the teacher's greedy outputs, so it measures how closely the student reproduces its
teacher. :func:`teacher_forced_kl` is the mean per-token KL(teacher || student) over the
teacher's greedy responses (token-weighted over the whole set), computed with the chunked losses;
``nll`` the student's mean per-token negative log-likelihood of the same tokens. Lower is better
for both.
"""

from __future__ import annotations

import torch

from distillm2.data import collate, encode_responses
from distillm2.losses import forward_kl, token_cross_entropy
from distillm2.models import response_logits
from distillm2.progress import progress_bar


def rouge_l_scores(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F-measure (0..1) of each prediction against its reference."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("rouge_l: no predictions")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (0..1) of predictions against references (pairwise)."""
    scores = rouge_l_scores(predictions, references)
    return sum(scores) / len(scores)


def bootstrap_ci(values: list[float], samples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (prompts resampled)."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.tensor(values, dtype=torch.float64)
    idx = torch.randint(0, len(values), (samples, len(values)), generator=gen)
    means = data[idx].mean(1).sort().values
    lo = int((1 - level) / 2 * samples)
    return float(means[lo]), float(means[samples - 1 - lo])


def rouge_summary(predictions: dict[str, str], references: dict[str, str]) -> dict:
    """ROUGE-L of the predictions whose id has a reference: ``{"rouge_l", "rouge_l_ci95", "n"}``
    (mean F-measure and its 95% bootstrap interval over prompts)."""
    ids = [i for i in references if i in predictions]
    scores = rouge_l_scores([predictions[i] for i in ids], [references[i] for i in ids])
    return {"rouge_l": sum(scores) / len(scores), "rouge_l_ci95": list(bootstrap_ci(scores)), "n": len(ids)}


@torch.no_grad()
def teacher_forced_kl(student, teacher, tokenizer, prompts: list[dict], responses: list[dict],
                      vocab: int, batch_size: int = 8, max_prompt_length=512, max_length=1024,
                      desc="kl") -> dict:
    """Token-weighted mean KL(teacher || student) and student NLL on ``responses`` (rows with
    ``id``, ``response``, ``finish_reason``), joined to ``prompts`` by id."""
    rows = encode_responses(tokenizer, prompts, responses, max_prompt_length, max_length)
    device = next(student.parameters()).device
    kl_sum = nll_sum = 0.0
    tokens = 0
    student.eval()
    teacher.eval()
    with progress_bar(total=len(rows), desc=desc, unit="row") as bar:
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i : i + batch_size], tokenizer.pad_token_id).to(device)
            s = response_logits(student, batch, vocab)
            t = response_logits(teacher, batch, vocab)
            kl_sum += float(forward_kl(s, t, batch.mask).sum())
            nll_sum += float(token_cross_entropy(s, batch.labels, batch.mask).sum())
            tokens += batch.num_tokens
            bar.update(len(rows[i : i + batch_size]))
    if tokens == 0:
        raise ValueError("teacher_forced_kl: no response tokens to score")
    return {"forward_kl": kl_sum / tokens, "nll": nll_sum / tokens, "tokens": tokens}
