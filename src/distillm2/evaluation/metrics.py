"""Metrics: ROUGE-L against reference outputs (with a bootstrap interval), teacher-forced
KL / NLL on teacher responses, and measures of a model's own greedy outputs.

ROUGE-L (``rouge-score``, F-measure, stemming on) compares greedy outputs with references -- by
default the teacher's greedy outputs, so it measures how closely the student reproduces its
teacher. :func:`teacher_forced_kl` is the mean per-token KL(teacher || student) over the
teacher's greedy responses (token-weighted over the whole set), computed with the chunked losses;
``nll`` the student's mean per-token negative log-likelihood of the same tokens. Lower is better
for both.

ROUGE-L against the teacher and KL on the teacher's text both favour methods trained on the
teacher's text, while DistiLLM-2's argument is about the student's own outputs. So
:func:`own_output_metrics` scores the model's own greedy outputs: the teacher's mean per-token
NLL of them (``teacher_nll_own_outputs``, lower = more plausible to the teacher) and two
repetition measures over their tokens, each averaged over responses: ``distinct_2`` (distinct
bigrams / bigrams; higher = less repetitive) and ``repeated_4gram_share`` (the share of tokens
covered by a 4-gram that occurs more than once in the same response; lower = less looping).
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


def teacher_forced_kl(student, teacher, tokenizer, prompts: list[dict], responses: list[dict],
                      vocab: int, batch_size: int = 8, max_prompt_length=512, max_length=1024,
                      desc="kl") -> dict:
    """Token-weighted mean KL(teacher || student) and student NLL on ``responses`` (rows with
    ``id``, ``response``, ``finish_reason``), joined to ``prompts`` by id."""
    return teacher_forced_kls({"student": student}, teacher, tokenizer, prompts, responses, vocab, batch_size,
                              max_prompt_length, max_length, desc)[0]["student"]


@torch.no_grad()
def teacher_forced_kls(students: dict, teacher, tokenizer, prompts: list[dict], responses: list[dict],
                       vocab: int, batch_size: int = 8, max_prompt_length=512, max_length=1024,
                       desc="kl") -> tuple[dict[str, dict], dict]:
    """:func:`teacher_forced_kl` of several ``students`` (name -> model) on the same ``responses``
    with one teacher forward per batch, and the teacher's own token-weighted NLL of those
    responses from that forward: ``({name: {"forward_kl", "nll", "tokens"}}, {"nll", "tokens"})``.
    The teacher's forward is the costly half of every KL (and, on its own greedy outputs, all of
    its own-output NLL): an evaluation of k students runs it once instead of k + 1 times."""
    rows = encode_responses(tokenizer, prompts, responses, max_prompt_length, max_length)
    device = next(teacher.parameters()).device
    sums = {name: [0.0, 0.0] for name in students}
    teacher_nll_sum, tokens = 0.0, 0
    teacher.eval()
    for model in students.values():
        model.eval()
    with progress_bar(total=len(rows), desc=desc, unit="row") as bar:
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i : i + batch_size], tokenizer.pad_token_id).to(device)
            t = response_logits(teacher, batch, vocab)
            teacher_nll_sum += float(token_cross_entropy(t, batch.labels, batch.mask).sum())
            for name, student in students.items():
                s = response_logits(student, batch, vocab)
                sums[name][0] += float(forward_kl(s, t, batch.mask).sum())
                sums[name][1] += float(token_cross_entropy(s, batch.labels, batch.mask).sum())
            tokens += batch.num_tokens
            bar.update(len(rows[i : i + batch_size]))
    if tokens == 0:
        raise ValueError("teacher_forced_kl: no response tokens to score")
    kls = {name: {"forward_kl": kl / tokens, "nll": nll / tokens, "tokens": tokens} for name, (kl, nll) in sums.items()}
    return kls, {"nll": teacher_nll_sum / tokens, "tokens": tokens}


@torch.no_grad()
def teacher_nll(teacher, tokenizer, prompts: list[dict], responses: list[dict], vocab: int, batch_size: int = 8,
                max_prompt_length: int = 512, max_length: int = 1024, desc: str = "teacher nll") -> dict:
    """Token-weighted mean NLL under ``teacher`` of ``responses`` (rows ``id``, ``response``,
    ``finish_reason``) joined to ``prompts`` by id: ``{"nll", "tokens"}``."""
    rows = encode_responses(tokenizer, prompts, responses, max_prompt_length, max_length)
    device = next(teacher.parameters()).device
    teacher.eval()
    nll_sum, tokens = 0.0, 0
    with progress_bar(total=len(rows), desc=desc, unit="row") as bar:
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i : i + batch_size], tokenizer.pad_token_id).to(device)
            t = response_logits(teacher, batch, vocab)
            nll_sum += float(token_cross_entropy(t, batch.labels, batch.mask).sum())
            tokens += batch.num_tokens
            bar.update(len(rows[i : i + batch_size]))
    return {"nll": nll_sum / tokens if tokens else float("nan"), "tokens": tokens}


def distinct_n(tokens: list, n: int = 2) -> float | None:
    """Distinct n-grams / n-grams of one token sequence; None when it has no n-gram."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def repeated_ngram_share(tokens: list, n: int = 4) -> float | None:
    """The share of ``tokens`` inside an n-gram that occurs more than once in the sequence;
    None for an empty sequence."""
    if not tokens:
        return None
    starts: dict[tuple, list[int]] = {}
    for i in range(len(tokens) - n + 1):
        starts.setdefault(tuple(tokens[i : i + n]), []).append(i)
    covered = set()
    for positions in starts.values():
        if len(positions) > 1:
            for i in positions:
                covered.update(range(i, i + n))
    return len(covered) / len(tokens)


def repetition(token_lists: list[list]) -> dict:
    """``distinct_2`` and ``repeated_4gram_share``, each the mean over the sequences where it
    is defined (NaN when none is)."""
    out = {}
    for name, values in (("distinct_2", [distinct_n(t, 2) for t in token_lists]),
                         ("repeated_4gram_share", [repeated_ngram_share(t, 4) for t in token_lists])):
        values = [v for v in values if v is not None]
        out[name] = sum(values) / len(values) if values else float("nan")
    return out


def own_output_metrics(teacher, tokenizer, prompts: list[dict], responses: list[dict], vocab: int,
                       batch_size: int = 8, max_prompt_length: int = 512, max_length: int = 1024,
                       desc: str = "own outputs") -> dict:
    """Measures of a model's own greedy ``responses`` (see the module docstring):
    ``{"teacher_nll_own_outputs", "distinct_2", "repeated_4gram_share", "n", "tokens"}``.
    Repetition is counted on the tokenizer's tokens of each response text."""
    nll = teacher_nll(teacher, tokenizer, prompts, responses, vocab, batch_size, max_prompt_length, max_length,
                      desc=desc)
    return own_metrics_from(tokenizer, responses, nll)


def own_metrics_from(tokenizer, responses: list[dict], nll: dict) -> dict:
    """:func:`own_output_metrics` given the teacher's NLL of ``responses`` (``{"nll", "tokens"}``,
    e.g. from :func:`teacher_forced_kls` when they are the teacher's own outputs)."""
    ids = [tokenizer(r["response"], add_special_tokens=False)["input_ids"] for r in responses]
    return {"teacher_nll_own_outputs": nll["nll"], **repetition(ids), "n": len(responses), "tokens": nll["tokens"]}
