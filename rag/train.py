"""Retrain BERT_q (and optionally the generator) on question-answer pairs with the RAG marginal likelihood.

    python -m rag.train --config configs/train/demo.yaml [--set key=value ...] [--resume latest|PATH]
    accelerate launch -m rag.train --config configs/train/nq-bart-large.yaml

BERT_d and the index never change. With `lora.rank` > 0 the trained parts get LoRA adapters (peft) and only the
adapters are saved. Checkpoints (the trained parameters, optimiser, scheduler, RNG and the data position, as
safetensors and JSON: rag/checkpoint.py, never pickle) go to OUTPUT/checkpoints/step-N; `--resume latest` continues
exactly where the last one stopped. The final model is written with `RagPipeline.save_pretrained` to OUTPUT/final.
"""

from __future__ import annotations

import rag.program  # noqa: F401 - first: the program's process settings, before torch loads

# isort: split
import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from rag import checkpoint
from rag.config import TrainConfig, load_config, resolve_config_path, save_config, to_dict
from rag.errors import RagError
from rag.model import LossSettings

log = logging.getLogger(__name__)


class TrainingError(RagError):
    pass


class _TiedWeightsNote(logging.Filter):
    """accelerate warns "Removed shared tensor ..." when it saves a model with tied input and output embeddings
    (SmolLM2, GPT-2, BART): the tie is restored on load, so the warning only alarms."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


TIED_WEIGHTS_NOTE = _TiedWeightsNote()


class Progress:
    """The data position, saved with every checkpoint."""

    def __init__(self):
        self.step = 0  # optimiser steps done
        self.best = -math.inf

    def state_dict(self) -> dict:
        return {"step": self.step, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.best = int(state["step"]), float(state["best"])


def batches_for(step: int, examples: list, cfg: TrainConfig, world: int) -> list[list[tuple[str, str]]]:
    """The micro-batches of optimiser step `step` for every process, from a permutation fixed by (seed, epoch):
    any process can compute any step's data, so a resumed run reads exactly what the uninterrupted one would."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    epoch_len = max(1, len(examples) // per_step)
    epoch, within = divmod(step, epoch_len)
    order = list(range(len(examples)))
    random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
    chosen = order[within * per_step : (within + 1) * per_step]
    rng = random.Random(cfg.seed * 7_919 + epoch)
    pairs = []
    for i in chosen:
        ex = examples[i]
        answer = ex.answers[0] if cfg.data.answer == "first" else rng.choice(ex.answers)
        pairs.append((ex.question, answer))
    return [pairs[s : s + cfg.batch_size] for s in range(0, len(pairs), cfg.batch_size)]


def load_examples(cfg: TrainConfig):
    from rag.qa_data import QAReport, read_qa

    report = QAReport()
    examples = []
    for entry in cfg.data.train:  # a file, or some of its rows: "file.jsonl[500:]"
        examples += read_qa(entry, cfg.data.format, cfg.data.on_error, report=report)
    if not examples:
        raise TrainingError(f"no training examples in {list(cfg.data.train)} ({report})")
    return examples, report


def evaluate(pipe, examples) -> dict:
    """Exact match, F1 and retrieval answer-recall@k on dev examples, in the pipeline's mode and k (the scores
    eval.qa reports, rag.metrics.example_scores)."""
    from rag.metrics import example_scores

    k = pipe.cfg.n_docs
    rows = []
    for s in range(0, len(examples), 8):
        chunk = examples[s : s + 8]
        for e, a in zip(chunk, pipe.answer_batch([e.question for e in chunk]), strict=True):
            rows.append(example_scores(a.text, [p.text for p in a.passages], e, k))
    n = max(1, len(rows))
    return {"exact_match": sum(r["em"] for r in rows) / n, "f1": sum(r["f1"] for r in rows) / n,
            f"recall@{k}": sum(r[f"recall@{k}"] or 0.0 for r in rows) / n}


def _checkpoints(out: Path) -> list[Path]:
    """Whole checkpoints, oldest first (a half-written one is a hidden `.step-N.partial` folder, never listed)."""
    whole = [p for p in (out / "checkpoints").glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(whole, key=lambda p: int(p.name[5:]))


@dataclass(frozen=True)
class Trained:
    final: Path  # the saved model (RagPipeline.load loads it)
    pipeline: object  # this process's trained RagPipeline


def train(cfg: TrainConfig, resume: str | None = None, progress: bool = True) -> Trained:
    """Train as `cfg` says (resuming from a checkpoint with `resume`); the saved model is OUTPUT/final."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from rag.first_use import load_pipeline
    from rag.resolve import load_rag_config

    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output_dir {out} is a file; give the run a folder of its own")
    # `cfg.rag` (a RAG config or a trained folder) with `cfg.rag_set`: the one RagConfig (mode, k, decoding,
    # precision) trained with, evaluated with and saved
    rag_cfg = load_rag_config(cfg.rag, cfg.rag_set)
    acc = _accelerator(cfg, rag_cfg, out)
    set_seed(cfg.seed)
    examples, report = load_examples(cfg)
    dev = _dev_examples(cfg)
    pipe = load_pipeline(rag_cfg, trainable=True)  # float32 weights; the precision comes through accelerate
    groups = _trainable_groups(cfg, pipe)
    optimizer, scheduler = _optimiser(cfg, groups)
    model, optimizer, scheduler = acc.prepare(pipe.module, optimizer, scheduler)
    state = _start(acc, cfg, out, resume, model, optimizer, scheduler)
    log.info("%d training examples (%d without answers and %d malformed skipped)", len(examples),
             report.skipped_no_answer, report.skipped_malformed)
    run = Run(acc, cfg, out, model, optimizer, scheduler, groups,
              LossSettings(pipe.cfg.mode, pipe.cfg.n_docs, cfg.label_smoothing, cfg.rag_loss, cfg.distant_loss,
                           cfg.distant_docs, cfg.distant_scale, cfg.unanswerable_weight))
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train", disable=not (progress and acc.is_main_process))
    while state.step < cfg.max_steps:
        loss = run.step(state.step, examples)
        state.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        run.after_step(state, pipe, dev, loss)
    bar.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        pipe.save_pretrained(out / "final")
    acc.end_training()
    pipe.module.eval()  # the returned pipeline answers like the saved one: no dropout in BERT_q
    return Trained(out / "final", pipe)


@dataclass
class Run:
    """What every optimiser step needs: the prepared objects and the loss settings."""

    acc: object
    cfg: TrainConfig
    out: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    groups: list[dict]
    settings: LossSettings

    def step(self, step: int, examples: list) -> float:
        """One optimiser step over this process's micro-batches; returns the mean loss."""
        acc, cfg = self.acc, self.cfg
        micro = batches_for(step, examples, cfg, acc.num_processes)
        mine = micro[acc.process_index :: acc.num_processes]
        total = 0.0
        for batch in mine:
            with acc.accumulate(self.model):
                questions, answers = [q for q, _ in batch], [a for _, a in batch]
                loss = self.model(questions, answers, self.settings).mean()
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss is {loss.item()} at step {step + 1} on the batch starting "
                                        f"{questions[:3]!r}; lower the learning rate or check the data")
                if loss.requires_grad:  # not when every question of the batch had weight 0
                    acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm:
                    acc.clip_grad_norm_([p for g in self.groups for p in g["params"]], cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
                total += loss.item() / len(mine)
        _check_finite(self.groups, step + 1, self.out)
        return total

    def after_step(self, state: Progress, pipe, dev: list, loss: float) -> None:
        """Log, evaluate and checkpoint when the config says so."""
        cfg, last = self.cfg, state.step == self.cfg.max_steps
        if state.step % cfg.log_every == 0 or last:
            _log(self.acc, self.out, cfg, {"loss": loss, "lr": self.scheduler.get_last_lr()[0]}, state.step)
        if dev and (state.step % cfg.eval_every == 0 or last):
            _evaluate(self.acc, pipe, dev, cfg, state, self.out)
        if state.step % cfg.checkpoint_every == 0 or last:
            _save_checkpoint(self.acc, self.out, cfg, state, self.model, self.optimizer, self.scheduler)


def _accelerator(cfg: TrainConfig, rag_cfg, out: Path):
    from accelerate import Accelerator

    logging.getLogger("accelerate.utils.other").addFilter(TIED_WEIGHTS_NOTE)  # once: the same filter object
    from rag.precision import resolve_device

    return Accelerator(cpu=resolve_device(rag_cfg.device).type == "cpu", mixed_precision=_mixed_precision(rag_cfg),
                       gradient_accumulation_steps=cfg.grad_accum,
                       log_with="tensorboard" if cfg.tracker == "tensorboard" else None, project_dir=str(out))


def _dev_examples(cfg: TrainConfig) -> list:
    if not cfg.data.dev:
        return []
    from rag.qa_data import read_qa

    return read_qa(cfg.data.dev, "auto", cfg.data.on_error)[: cfg.data.dev_limit]


def _trainable_groups(cfg: TrainConfig, pipe) -> list[dict]:
    """Freeze what does not train, add LoRA layers and gradient checkpointing as asked; the optimiser's groups."""
    parts = pipe.parts()
    query_encoder, generator = parts["query_encoder"], parts["generator"]
    query_encoder.requires_grad_(cfg.train_query_encoder)
    pooler = getattr(query_encoder.model, "pooler", None)
    if pooler is not None and query_encoder.cfg.pooling != "pooler":
        pooler.requires_grad_(False)  # unused by cls/mean pooling: a parameter DDP would wait on for ever
    generator.requires_grad_(cfg.train_generator)
    if not (cfg.train_query_encoder or cfg.train_generator):
        raise TrainingError("nothing to train: set train_query_encoder or train_generator")
    if cfg.rag_loss <= 0 and (cfg.train_generator or cfg.distant_loss <= 0):
        raise TrainingError("rag_loss 0 leaves " + ("the generator without a loss; set rag_loss > 0"
                            if cfg.train_generator else "no loss at all; set rag_loss or distant_loss > 0"))
    if cfg.lora.rank:
        _add_adapters(cfg, parts)
    if cfg.gradient_checkpointing:
        for part, on in ((query_encoder.model, cfg.train_query_encoder), (generator.model, cfg.train_generator)):
            if on and getattr(part, "supports_gradient_checkpointing", False):
                part.gradient_checkpointing_enable()
    groups = []
    if cfg.train_query_encoder:
        groups.append({"params": [p for p in query_encoder.parameters() if p.requires_grad],
                       "lr": cfg.lr_query_encoder})
    if cfg.train_generator:
        groups.append({"params": [p for p in generator.parameters() if p.requires_grad], "lr": cfg.lr_generator})
    return groups


def _optimiser(cfg: TrainConfig, groups: list[dict]):
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    return optimizer, get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)


def _start(acc, cfg: TrainConfig, out: Path, resume: str | None, model, optimizer, scheduler) -> Progress:
    """A fresh run (its config written beside its output) or the state of the checkpoint `resume` names."""
    state = Progress()
    if resume:
        path = _resolve_resume(out, resume)
        _check_same_config(path, cfg)
        state.load_state_dict(checkpoint.load(path, acc.unwrap_model(model), optimizer, scheduler,
                                              acc.process_index))
        log.info("resumed from %s at step %d", path, state.step)
    elif acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "train.yaml")
    if cfg.tracker == "tensorboard":
        acc.init_trackers("rag", config={k: str(v) for k, v in to_dict(cfg).items()})
    return state


def _check_finite(groups: list[dict], step: int, out: Path) -> None:
    """A step that made a trained weight NaN or infinite stops the run before anything is evaluated or saved."""
    params = [p for g in groups for p in g["params"]]
    if not torch.stack([torch.isfinite(p).all() for p in params]).all():
        last = _checkpoints(out)
        raise TrainingError(f"step {step} made trained weights NaN or infinite (the run diverged); nothing of it "
                            "was saved. Lower the learning rate (or set max_grad_norm)"
                            + (f" and resume from {last[-1]}" if last else ""))


def _mixed_precision(rag_cfg) -> str:
    """accelerate's mixed precision from the RAG config's one precision knob, on the RAG config's device (both
    decided by rag/precision.py)."""
    from rag.precision import resolve_device, resolve_precision

    dtype = resolve_precision(rag_cfg.precision, resolve_device(rag_cfg.device))
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def _log(acc, out: Path, cfg: TrainConfig, values: dict, step: int) -> None:
    """To accelerate's trackers (TensorBoard) or, with tracker: csv, to OUTPUT/metrics.csv (step,name,value)."""
    acc.log(values, step=step)
    if cfg.tracker == "csv" and acc.is_main_process:
        path = out / "metrics.csv"
        new = not path.exists()
        with open(path, "a", encoding="utf-8") as f:
            if new:
                f.write("step,name,value\n")
            f.writelines(f"{step},{k},{v}\n" for k, v in values.items())


def _evaluate(acc, pipe, dev, cfg, state, out):
    acc.wait_for_everyone()
    if acc.is_main_process:
        was = pipe.module.training
        pipe.module.eval()
        scores = evaluate(pipe, dev)
        pipe.module.train(was)
        _log(acc, out, cfg, {f"dev/{k}": v for k, v in scores.items()}, state.step)
        log.info("step %d dev %s", state.step, json.dumps(scores))
        if scores["exact_match"] + scores["f1"] / 1000 > state.best:  # EM first, F1 breaks ties
            state.best = scores["exact_match"] + scores["f1"] / 1000
            pipe.save_pretrained(out / "best")
    acc.wait_for_everyone()


def _add_adapters(cfg: TrainConfig, parts: dict) -> None:
    """Fresh LoRA layers on each trained part (peft freezes the rest of its weights)."""
    from rag.adapters import add_lora

    for name, on in (("query_encoder", cfg.train_query_encoder), ("generator", cfg.train_generator)):
        if not on:
            continue
        part = parts[name]
        if part.cfg.adapter:
            raise TrainingError(f"{name}.adapter is set ({part.cfg.adapter}): LoRA trains from the base weights; "
                                f"set {name}.adapter=null in rag_set, or lora.rank=0 to fine-tune fully")
        part.model = add_lora(part.model, cfg.lora, getattr(cfg.lora, f"{name}_modules"), name)


def _save_checkpoint(acc, out: Path, cfg: TrainConfig, state: Progress, model, optimizer, scheduler) -> None:
    acc.wait_for_everyone()
    path = out / "checkpoints" / f"step-{state.step}"
    partial = path.with_name(f".{path.name}.partial")  # renamed once whole: a kill while writing leaves no step-N
    if acc.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    acc.wait_for_everyone()
    checkpoint.save(partial, acc.unwrap_model(model), optimizer, scheduler, state.state_dict(), acc.is_main_process,
                    acc.process_index)
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_config(cfg, partial / "train.yaml")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(partial, path)
        for old in _checkpoints(out)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _resolve_resume(out: Path, resume: str) -> Path:
    if resume == "latest":
        found = _checkpoints(out)
        if not found:
            raise TrainingError(f"--resume latest: no checkpoint under {out / 'checkpoints'}")
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / "train.yaml").is_file():
        raise TrainingError(f"--resume {path}: not a checkpoint folder (no train.yaml)")
    return path


# Settings that may change when resuming: they do not change what the run computes.
RESUME_FREE = {"max_steps", "checkpoint_every", "keep_checkpoints", "eval_every", "log_every", "tracker"}


def _check_same_config(path: Path, cfg: TrainConfig) -> None:
    saved = load_config(TrainConfig, path / "train.yaml")
    a, b = to_dict(saved), to_dict(cfg)
    diff = [f"{k}: checkpoint has {a[k]!r}, config has {b[k]!r}" for k in a if k not in RESUME_FREE and a[k] != b[k]]
    if diff:
        raise TrainingError(f"{path} was written by another config ({'; '.join(diff)}); "
                            "resume with the config it was trained with or start a new output_dir")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rag-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="training config YAML (changes from TrainConfig's defaults)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    from rag.errors import quiet_logging, run_cli

    quiet_logging()

    def run() -> int:
        cfg = load_config(TrainConfig, resolve_config_path(args.config) if args.config else None, args.set)
        done = train(cfg, args.resume, progress=not args.quiet)
        print(f"trained model: {done.final}")
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
