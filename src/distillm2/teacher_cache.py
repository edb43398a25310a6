"""The teacher's top-k cache of the chosen rows (``train.teacher_topk``).

The chosen rows of DistiLLM-2 are the teacher's own responses, the same in every round (unless
``generation.teacher_per_round``) and for every method of ``compare``. With ``train.teacher_topk
= k`` the teacher runs once over them, before the first step, and what the losses need is kept
on disk (:mod:`distillm2._topk`): per response position the k largest log-probabilities at the
loss's temperature (float16) and their token ids (int32), the log of the remaining mass and the
log-probability of the label token (float32). Later stages and later methods read it instead of
running the teacher on those rows, so the teacher's forward covers only the rejected rows.

Layout: ``<dir>/<key>/key.json`` and ``part-NNNNN.pt`` shards (``torch.save``, written to a
temporary name and renamed, so a kill leaves whole shards only: a resumed build computes the
rows no shard holds). ``<key>`` hashes what determines the values: the teacher's weights (a
fingerprint of the loaded parameters, so their dtype too), its config and attention kernel, the
vocabulary width, k, the temperature and the format; another key is another directory, so a
changed teacher or temperature rebuilds without touching the old cache. Each row is found by a
hash of its token ids (prompt and response), so a pair whose text changed is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from distillm2._schema import check_topk_setting
from distillm2._topk import TopKTeacher, topk_of_logits
from distillm2.data import EncodedRow, collate
from distillm2.errors import ConfigError
from distillm2.faults import maybe_crash
from distillm2.files import atomic_path, write_json_atomic
from distillm2.losses import topk_unsupported
from distillm2.models import response_logits
from distillm2.progress import logger, progress_bar

FORMAT = 1
STORE_DTYPE = torch.float16  # of the top-k log-probabilities (benchmarks/topk.py measures its error)
SHARD_TOKENS = 2**16  # response positions per shard: the unit of work a kill can lose


def check_topk(k: int, loss: str, fused: bool, processes: int) -> None:
    """Refuse ``train.teacher_topk = k`` where it cannot apply, naming the key and the reason."""
    check_topk_setting(k, fused)
    if not k:
        return
    why = topk_unsupported(loss)
    if why:
        raise ConfigError(f"train.teacher_topk: {why}; set train.teacher_topk: 0")
    if processes > 1:
        raise ConfigError(f"train.teacher_topk needs one process, got {processes}: the cache is built by one "
                          "teacher forward outside the engine; set train.teacher_topk: 0 to run distributed")


def row_key(row: EncodedRow) -> str:
    """A row's identity in the cache: a hash of its prompt and response token ids."""
    blob = json.dumps([row.prompt_ids, row.response_ids], separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


@torch.no_grad()
def model_fingerprint(model) -> str:
    """A hash of a loaded model's parameters (names, shapes, dtypes, float64 sums of values and
    absolute values, and a strided sample of each), its config and attention kernel; memoised on
    the model, which is frozen."""
    cached = getattr(model, "_distillm2_fingerprint", None)
    if cached:
        return cached
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(config.to_json_string(use_diff=True).encode())
        h.update(str(getattr(config, "_attn_implementation", None)).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].double().cpu()
        sums = torch.stack([flat.sum(dtype=torch.float64), flat.abs().sum(dtype=torch.float64)]).cpu()
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{sums.tolist()}|".encode())
        h.update(sample.numpy().tobytes())
    digest = h.hexdigest()[:16]
    try:
        model._distillm2_fingerprint = digest
    except AttributeError:  # a wrapper that refuses attributes: recomputed next time
        pass
    return digest


class TopKCache:
    """One key's cache directory: which rows it holds and their stored tensors."""

    def __init__(self, root: str | Path, key: dict):
        self.key = {"format": FORMAT, **key}
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root) / digest
        self.k = int(key["k"])
        self._index: dict[str, tuple[dict, int, int]] = {}
        self._shards = 0
        if self.dir.exists():
            self._load()

    def _load(self) -> None:
        for path in sorted(self.dir.glob("part-*.pt")):
            self._shards += 1
            try:
                shard = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as err:  # noqa: BLE001 - an unreadable shard is recomputed, not fatal
                logger.warning("%s: unreadable (%s); its rows are recomputed", path, err)
                path.unlink(missing_ok=True)
                continue
            self._add(shard)

    def _add(self, shard: dict) -> None:
        offsets = shard["offsets"].tolist()
        for i, row in enumerate(shard["rows"]):
            self._index[row] = (shard, offsets[i], offsets[i + 1])

    def __contains__(self, row: str) -> bool:
        return row in self._index

    def __len__(self) -> int:
        return len(self._index)

    def write(self, rows: list[str], parts: list[TopKTeacher]) -> None:
        """Store one shard: ``parts[i]`` the ``[1, n_i, k]`` top-k teacher of row ``rows[i]``."""
        lengths = [p.indices.shape[1] for p in parts]
        shard = {
            "rows": list(rows),
            "offsets": torch.tensor([0, *lengths]).cumsum(0),
            "logprobs": torch.cat([p.logprobs[0] for p in parts]).to(STORE_DTYPE),
            "indices": torch.cat([p.indices[0] for p in parts]).to(torch.int32),
            "tail": torch.cat([p.tail[0] for p in parts]).float(),
            "label": torch.cat([p.label[0] for p in parts]).float(),
        }
        if self._shards == 0:
            write_json_atomic(self.dir / "key.json", self.key)
        while (path := self.dir / f"part-{self._shards:05d}.pt").exists():
            self._shards += 1
        with atomic_path(path) as tmp:
            torch.save(shard, tmp)
        self._shards += 1
        self._add(shard)

    def lookup(self, rows: list[str], length: int, vocab: int, temperature: float, device) -> TopKTeacher:
        """The stored rows padded to ``length`` positions as one ``[B, length, k]`` top-k teacher
        (positions past a row's response hold a valid dummy: masked out by the loss)."""
        b, k = len(rows), self.k
        logprobs = torch.full((b, length, k), -torch.log(torch.tensor(k + 1.0)).item())
        indices = torch.arange(k).expand(b, length, k).clone()
        tail = logprobs[..., 0].clone()
        label = torch.zeros((b, length))
        for i, row in enumerate(rows):
            shard, start, end = self._index[row]
            n = min(end - start, length)
            logprobs[i, :n] = shard["logprobs"][start : start + n].float()
            indices[i, :n] = shard["indices"][start : start + n].long()
            tail[i, :n] = shard["tail"][start : start + n]
            label[i, :n] = shard["label"][start : start + n]
        return TopKTeacher(logprobs, indices, tail, label, vocab, temperature).to(device)


class ChosenTopK:
    """The chosen rows' top-k teacher of one stage: built (or completed) once, then looked up."""

    def __init__(self, root: str | Path, teacher, rows: list[EncodedRow], *, k: int, temperature: float, vocab: int,
                 pad_id: int, batch_rows: int, device, stage: str = "train"):
        self.k, self.temperature, self.vocab = min(int(k), vocab), float(temperature), vocab
        key = {"teacher": model_fingerprint(teacher), "vocab": vocab, "k": self.k, "temperature": self.temperature}
        self.cache = TopKCache(root, key)
        self.keys = [row_key(r) for r in rows]
        todo: dict[str, EncodedRow] = {}
        for key_, row in zip(self.keys, rows):
            if key_ not in self.cache:
                todo.setdefault(key_, row)
        if todo:
            self._build(teacher, todo, pad_id, max(1, batch_rows), device, stage)
        logger.info("%s: teacher top-%d of %d chosen rows from %s (%d computed now)", stage, self.k,
                    len(set(self.keys)), self.cache.dir, len(todo))

    @torch.no_grad()
    def _build(self, teacher, todo: dict[str, EncodedRow], pad_id: int, batch_rows: int, device, stage: str):
        order = sorted(todo, key=lambda r: -(len(todo[r].prompt_ids) + len(todo[r].response_ids)))
        pending_rows, pending, tokens, shards = [], [], 0, 0
        with progress_bar(total=len(order), desc=f"{stage} teacher top-{self.k}", unit="row") as bar:
            for start in range(0, len(order), batch_rows):
                names = order[start : start + batch_rows]
                batch = collate([todo[r] for r in names], pad_id).to(device)
                logits = response_logits(teacher, batch, self.vocab)
                top = topk_of_logits(logits, batch.labels, self.k, self.temperature)
                del logits
                for i, name in enumerate(names):
                    n = len(todo[name].response_ids)
                    part = top[i : i + 1]
                    pending.append(TopKTeacher(part.logprobs[:, :n].cpu(), part.indices[:, :n].cpu(),
                                               part.tail[:, :n].cpu(), part.label[:, :n].cpu(), self.vocab,
                                               self.temperature))
                    pending_rows.append(name)
                    tokens += n
                bar.update(len(names))
                if tokens >= SHARD_TOKENS or start + batch_rows >= len(order):
                    self.cache.write(pending_rows, pending)
                    pending_rows, pending, tokens = [], [], 0
                    shards += 1
                    maybe_crash(f"{stage}/topk", shards)

    def teacher(self, pair_indices: list[int], length: int, device) -> TopKTeacher:
        """The top-k teacher of the chosen rows of these pairs, ``[len(pair_indices), length, k]``."""
        return self.cache.lookup([self.keys[i] for i in pair_indices], length, self.vocab, self.temperature, device)
