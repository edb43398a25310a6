"""The final student's model card, and publishing it to the Hugging Face Hub.

``RUN/final/README.md`` is written when the run finishes (and again after its evaluation): the
base student, the teacher, the data, the loss and its settings, the rounds, the held-out
evaluation table, the paper's citation and the resolved config. :func:`push` uploads
``RUN/final`` with it (``distillm2 push RUN --model-id ID``, or ``hub.push: true`` in the run's
config); the token comes from the environment or the Hub's login, never from a file we write.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from distillm2._version import __version__
from distillm2.errors import DataError, MissingExtra
from distillm2.files import write_text_atomic
from distillm2.progress import logger

CITATION = """@inproceedings{ko2025distillm2,
  title     = {DistiLLM-2: A Contrastive Approach Boosts the Distillation of LLMs},
  author    = {Ko, Jongwoo and Chen, Tianyi and Kim, Sungnyun and Ding, Tianyu and Liang, Luming and
               Zharkov, Ilya and Yun, Se-Young},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2025}
}"""


def _config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.exists():
        raise DataError(f"{run_dir}: not a run directory (no config.yaml)")
    return yaml.safe_load(path.read_text()) or {}


def model_card(run_dir: str | Path) -> str:
    """The model card (README.md with Hub metadata) of ``run_dir``'s final student."""
    run_dir = Path(run_dir)
    cfg = _config(run_dir)
    models, data, loss, train = (cfg.get(k, {}) for k in ("models", "data", "loss", "train"))
    student = models.get("student") or (
        f"{models.get('teacher')} with layers {models.get('student_layers')}" if models.get("student_layers")
        else f"{models.get('teacher')} cut to {models.get('student_num_layers') or 'half its'} layers")
    base = models.get("student") or models.get("teacher")
    lora = f"r {models.get('lora_r')}, alpha {models.get('lora_alpha')}, merged" if models.get("lora") else "no"
    lines = ["---", "library_name: transformers", "tags:", "- distillation", "- distillm2", "- knowledge-distillation",
             f"base_model: {base}", "---", "", f"# {run_dir.name}", "",
             f"A student distilled with distillm2 {__version__} "
             f"({loss.get('name', 'distillm2')} loss; DistiLLM-2, Ko et al., ICML 2025).", "",
             "| | |", "|---|---|", f"| teacher | {models.get('teacher')} |", f"| student (before training) | {student} |",
             f"| LoRA | {lora} |",
             f"| prompts | {data.get('prompts')} ({_count(run_dir / 'prompts.jsonl')} used) |",
             f"| warm-up | {cfg.get('sft_epochs', 0)} epochs on {_sft_source(run_dir)} responses |",
             f"| rounds | {cfg.get('rounds')} (student responses resampled every round) |",
             f"| loss | {loss.get('name')}: alpha0 {loss.get('alpha0')}, curriculum {loss.get('curriculum')}, "
             f"beta {loss.get('beta_schedule')} ({loss.get('beta0')} -> {loss.get('beta_max')}) |",
             f"| optimiser | {train.get('optimizer')} lr {train.get('lr')}, batch {train.get('batch_size')} x "
             f"{train.get('grad_accum')} accumulation per process |", ""]
    results = run_dir / "eval" / "report.md"
    if results.exists():
        lines += ["## Held-out evaluation", "", results.read_text().split("\n", 2)[-1].strip(), ""]
    lines += ["## Citation", "", "```bibtex", CITATION, "```", "", "## Config", "", "```yaml",
              yaml.safe_dump(cfg, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def _count(path: Path) -> int:
    return sum(1 for line in path.open() if line.strip()) if path.exists() else 0


def _sft_source(run_dir: Path) -> str:
    path = run_dir / "sft" / "sft_source.json"
    return yaml.safe_load(path.read_text())["responses"].replace("_", "-") if path.exists() else "no"


def write_model_card(run_dir: str | Path) -> Path:
    """Write ``RUN/final/README.md``; returns its path."""
    target = Path(run_dir) / "final" / "README.md"
    write_text_atomic(target, model_card(run_dir))
    return target


def push(run_dir: str | Path, model_id: str, *, private: bool = True, api=None) -> str:
    """Upload ``RUN/final`` (model, tokenizer, card) to the Hub repository ``model_id``; returns
    its URL. ``api``: a ``huggingface_hub.HfApi`` (or a stand-in, for tests)."""
    run_dir = Path(run_dir)
    final = run_dir / "final"
    if not (final / "config.json").exists():
        raise DataError(f"{final}: no finished student to push (run the pipeline first)")
    if not model_id or "/" not in model_id:
        raise DataError(f"--model-id: expected 'user/name' or 'org/name', got {model_id!r}")
    write_model_card(run_dir)
    if api is None:
        try:
            from huggingface_hub import HfApi
        except ImportError:
            raise MissingExtra("pushing to the Hub", command="pip install huggingface_hub") from None
        api = HfApi()
    api.create_repo(model_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(final), repo_id=model_id, repo_type="model",
                      commit_message=f"distillm2 {__version__}: {run_dir.name}")
    url = f"https://huggingface.co/{model_id}"
    logger.info("pushed %s to %s", final, url)
    return url
