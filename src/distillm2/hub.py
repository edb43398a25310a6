"""The final student's model card, and publishing it to the Hugging Face Hub.

``RUN/final/README.md`` is written when the run finishes (and again after its evaluation): the
base student, the teacher, the data, the loss and its settings, the rounds, the held-out
evaluation table, the paper's citation and the resolved config. :func:`push` uploads
``RUN/final`` with it (``distillm2 push RUN --model-id ID``, or ``hub.push: true`` in the run's
config); the token comes from the environment or the Hub's login, never from a file we write.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from distillm2._version import __version__
from distillm2.errors import DataError, MissingExtra
from distillm2.files import write_text_atomic
from distillm2.models import EMBEDDED_HUB_IDS
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
    base = hub_id(models.get("student") or models.get("teacher"))
    lora = f"r {models.get('lora_r')}, alpha {models.get('lora_alpha')}, merged" if models.get("lora") else "no"
    lines = ["---", "library_name: transformers", "tags:", "- distillation", "- distillm2", "- knowledge-distillation",
             *([f"base_model: {base}"] if base else []), "---", "", f"# {run_dir.name}", "",
             f"A student distilled with distillm2 {__version__} "
             f"({loss.get('name', 'distillm2')} loss; DistiLLM-2, Ko et al., ICML 2025).", "",
             "| | |", "|---|---|", f"| teacher | {models.get('teacher')} |", f"| student (before training) | {student} |",
             f"| LoRA | {lora} |",
             f"| prompts | {data.get('prompts')} ({_count(run_dir / 'prompts.jsonl')} used) |",
             f"| warm-up | {cfg.get('sft_epochs', 0)} epochs on {_sft_source(run_dir)} responses |",
             *_stages(run_dir, cfg),
             f"| loss | {_loss(loss, cfg.get('rounds') or 1)} |",
             f"| optimiser | {train.get('optimizer')} lr {train.get('lr')}, batch {train.get('batch_size')} x "
             f"{train.get('grad_accum')} accumulation per process |", ""]
    results = run_dir / "eval" / "report.md"
    if results.exists():
        lines += ["## Held-out evaluation", "", results.read_text().split("\n", 2)[-1].strip(), ""]
    lines += ["## Citation", "", "```bibtex", CITATION, "```", "", "## Config", "", "```yaml",
              yaml.safe_dump(cfg, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def hub_id(name: str | None) -> str | None:
    """The Hub id behind a model name for the card's ``base_model`` (which must be one): an
    embedded model's source, a local directory's ``_name_or_path`` when that is a Hub id, a
    Hub id itself; None where none is known (a local path is never written there)."""
    if not name:
        return None
    if name in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[name]
    path = Path(name).expanduser()
    if path.exists():
        config = path / "config.json"
        origin = json.loads(config.read_text()).get("_name_or_path", "") if config.exists() else ""
        return origin if _HUB_ID.match(origin) and not Path(origin).exists() else None
    return name if _HUB_ID.match(name) else None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _stages(run_dir: Path, cfg: dict) -> list[str]:
    """The card's rows on what was trained: a run's rounds, or ``distillm2 train``'s one stage."""
    if (run_dir / "train").exists() and not (run_dir / "round-1").exists():
        return [f"| training | one stage on given pairs ({_count(run_dir / 'prompts.jsonl')} pairs; no responses sampled) |"]
    rounds = cfg.get("rounds")
    return [f"| rounds | {rounds} (student responses resampled every round) |"]


def _loss(loss: dict, rounds: int) -> str:
    """The loss and the settings that took effect: the curriculum only from round 2, beta's
    range only when it is scheduled."""
    name = loss.get("name", "distillm2")
    if name != "distillm2":
        return name
    alpha = f"alpha {loss.get('alpha0')}"
    if loss.get("curriculum"):
        alpha += (f" in round 1, then adaptive in [{loss.get('alpha_min')}, {loss.get('alpha_max')}] (curriculum)"
                  if rounds > 1 else " (the curriculum starts in round 2: not used in a 1-round run)")
    schedule = loss.get("beta_schedule", "constant")
    beta = f"beta {loss.get('beta0')}" if schedule == "constant" else \
        f"beta {schedule} {loss.get('beta0')} -> {loss.get('beta_max')}"
    return f"{name}: {alpha}; {beta}"


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
