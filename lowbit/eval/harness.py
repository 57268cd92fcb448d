"""Task evaluation for ``lowbit eval --tasks``: the offline cloze task and zero-shot tasks of lm-eval.

Task names (comma-separated in ``--tasks``):

* ``cloze`` — :mod:`lowbit.eval.cloze` on the ``--text`` source; ``cloze:FILE`` on any local text
  (a file or folder).  No lm-eval needed.
* anything else — an lm-eval task, group or tag (``hellaswag``, ``arc_easy``, ``piqa``…) or the path
  of a task YAML file (e.g. a custom task over a local JSON file via ``dataset_kwargs.data_files``),
  run by lm-eval's ``simple_evaluate`` on the already-loaded model wrapped in its ``HFLM``.  lm-eval is
  the optional extra ``lowbit[eval]``; it downloads the task's data set on first use, so offline
  only cached or local tasks work and any other fails with one line naming the task.

Per-task results are ``{"acc": …, "acc_norm": …, "acc_stderr": …, "n": …}`` as lm-eval reports
them (``acc`` = fraction of examples whose highest-log-likelihood choice is the gold one;
``acc_norm`` the same with log-likelihoods divided by the choice's length in bytes); the cloze task
gives ``{"acc", "nll", "n"}``.

Results of ``lowbit eval`` on a lowbit folder are kept in ``DIR/evals.json`` (:func:`append_eval`), those
on a float model in lowbit's cache (:func:`fp_evals_file`), where ``lowbit report`` finds its baseline.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import random
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import LowbitError

EVALS_FILE = "evals.json"
CLOZE = "cloze"


def parse_tasks(spec: str | None) -> list[str]:
    """``"hellaswag, cloze"`` -> ``["hellaswag", "cloze"]`` (order kept, duplicates dropped)."""
    names = [t.strip() for t in (spec or "").split(",") if t.strip()]
    return list(dict.fromkeys(names))


def is_cloze(name: str) -> bool:
    return name == CLOZE or name.startswith(CLOZE + ":")


@contextmanager
def _rng_preserved():
    """lm-eval seeds ``random``, numpy and torch; give the caller its RNG states back."""
    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


@contextmanager
def _silenced(*loggers: str):
    saved = {n: logging.getLogger(n).level for n in loggers}
    for n in loggers:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:300]


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LowbitError("--tasks: lm-eval tasks need the package lm-eval: pip install 'lowbit[eval]' "
                          "(the offline task 'cloze' needs nothing)") from None
    return lm_eval, HFLM, TaskManager


def _load_tasks(names: list[str], manager) -> list:
    """Build every lm-eval task, one by one, so a failure names its task."""
    objs = []
    for name in names:
        try:
            with _silenced("huggingface_hub", "datasets", "fsspec"):  # their retry warnings; we say it once
                loaded = manager.load(name)
        except KeyError:
            raise LowbitError(f"lm-eval has no task '{name}' (list them with: lm-eval ls tasks)") from None
        except Exception as e:  # datasets/hub errors of many types: offline, unknown data set, bad YAML
            raise LowbitError(f"lm-eval could not load task {name}: {_first_line(e)} (no internet?)") from None
        groups = loaded["groups"]
        objs.extend([groups[name]] if name in groups else list(loaded["tasks"].values()))
    return objs


def run_lm_eval(model, tokenizer, names: list[str], *, limit: int | None = None, num_fewshot: int | None = None,
                batch_size: int = 4, progress: bool = False) -> dict:
    """lm-eval tasks on an in-memory model -> ``{task: {"acc", "acc_norm", "acc_stderr", "n"}}``
    (groups included, with their aggregate).  The caller's RNG states are restored afterwards."""
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    if not progress:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    with _rng_preserved():
        manager = TaskManager(verbosity="ERROR")
        tasks = _load_tasks(names, manager)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=1000,
                                          verbosity="ERROR")
        except LowbitError:
            raise
        except Exception as e:
            raise LowbitError(f"lm-eval failed on {', '.join(names)}: {_first_line(e)}") from None
    results = {}
    for task, metrics in (out or {}).get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and filt == "none":
                row[metric] = float(value)
        n = metrics.get("sample_len") or (out.get("n-samples", {}).get(task, {}) or {}).get("effective")
        if n is not None:
            row["n"] = int(n)
        results[task] = row
    return results


def run_tasks(model, tokenizer, names: list[str], *, text: str = "default", limit: int | None = None,
              num_fewshot: int | None = None, batch_size: int = 4, cloze_passages: int = 300,
              cloze_context: int = 128, seed: int = 0, progress: bool = False) -> dict:
    """Every task of ``names`` -> ``{"tasks": {name: {...}}, "cloze_accuracy", "cloze_nll",
    "cloze_passages"}`` (the top-level cloze keys from the first cloze task)."""
    from .cloze import evaluate_cloze

    if limit is not None and limit < 1:  # (not folded into --cloze-passages below, whose name it would take)
        raise LowbitError(f"--limit {limit} must be >= 1")
    tasks, flat = {}, {}
    for name in names:
        if not is_cloze(name):
            continue
        source = name.partition(":")[2] or text
        if cloze_passages is not None and limit:
            cloze_passages = min(cloze_passages, limit)
        r = evaluate_cloze(model, tokenizer, source, n_passages=cloze_passages, context_tokens=cloze_context,
                           seed=seed, batch_size=batch_size)
        tasks[name] = {"acc": r["cloze_accuracy"], "nll": r["cloze_nll"], "n": r["cloze_passages"],
                       "seconds": r["seconds"]}
        if not flat:
            flat = {k: r[k] for k in ("cloze_accuracy", "cloze_nll", "cloze_passages")}
    others = [n for n in names if not is_cloze(n)]
    if others:
        tasks.update(run_lm_eval(model, tokenizer, others, limit=limit, num_fewshot=num_fewshot,
                                 batch_size=batch_size, progress=progress))
    return {**flat, "tasks": tasks}


def read_evals(model_dir: str | os.PathLike, name: str = EVALS_FILE) -> list[dict]:
    """The records of ``DIR/evals.json`` (or ``DIR/name``; ``[]`` when there is none)."""
    path = Path(model_dir) / name
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except RecursionError:
        raise LowbitError(f"{path}: not valid JSON (nested too deeply)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise LowbitError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise LowbitError(f"{path}: expected a list of evaluation records")
    return [r for r in data if isinstance(r, dict)]


def append_eval(model_dir: str | os.PathLike, record: dict) -> Path:
    """Append ``record`` (stamped with ``date``, UTC ISO 8601) to ``DIR/evals.json``, atomically."""
    return append_record(Path(model_dir) / EVALS_FILE, record)


def text_key(source: str) -> str:
    """What identifies an evaluation text across runs: a local file or folder by its absolute path
    (``--text my.txt`` and ``--text ./my.txt`` are the same text), anything else (``default``, a data set) as given."""
    p = Path(source)
    return str(p.resolve()) if source != "default" and p.exists() else source


def fp_evals_file(info: dict) -> Path:
    """Where the evaluations of a float model are kept: ``<lowbit cache>/evals/<name>-<key>.json``, the
    key a hash of the resolved source (``lowbit.models.sources.resolve``: kind, path, GGUF file), so a
    lowbit folder's recorded ``source`` finds the evaluations of the model it was quantized from."""
    import hashlib

    from ..models.sources import cache_dir

    ident = "|".join(str(info.get(k) or "") for k in ("kind", "path", "gguf_file"))
    name = Path(info.get("gguf_file") or str(info.get("path") or "model")).name.removesuffix(".gguf") or "model"
    return cache_dir() / "evals" / f"{name}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"


def read_fp_evals(info: dict) -> list[dict]:
    """The cached evaluation records of the float model described by ``info`` (``[]`` when none)."""
    path = fp_evals_file(info)
    return read_evals(path.parent, path.name) if path.is_file() else []


def record_eval(source: str, meta: dict | None, record: dict) -> Path | None:
    """Keep an evaluation: a lowbit folder's in ``DIR/evals.json``; a float model's in the cache
    (:func:`fp_evals_file`; best effort, ``None`` when the cache cannot be written or the source not resolved)."""
    if meta is not None:
        return append_eval(source, record)
    from ..models.sources import resolve

    try:
        info = resolve(source)
        return append_record(fp_evals_file(info), {"source": source, **record})
    except (LowbitError, OSError):
        return None


def append_record(path: Path, record: dict) -> Path:
    """Append ``record`` (stamped with ``date``) to the JSON list in ``path``, atomically."""
    from ..jsonio import dumps
    from ..outputs import write_texts

    records = read_evals(path.parent, path.name)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    records.append({"date": date, **record})
    write_texts([(path, dumps(records, indent=1) + "\n", None)])  # strict JSON; complete or unchanged
    return path


def check_available(names: list[str]) -> None:
    """Fail early (before loading a model) when a task needs lm-eval and it is not installed."""
    if any(not is_cloze(n) for n in names):
        _import_lm_eval()
