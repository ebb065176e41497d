"""The training loop: micro-batch grouping, cadence of logging / dev eval / checkpoints.

No loss math lives here: a ``Method`` computes each optimizer step.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from torch.utils.data import DataLoader, DistributedSampler

from promptkd import distributed as dist
from promptkd.config import Config
from promptkd.data import ListDataset, TokenizedExample
from promptkd.methods import Method
from promptkd.methods.base import StepResult
from promptkd.metrics import MetricsLogger, format_scalars
from promptkd.training import checkpoint
from promptkd.training.faults import before_step, configured
from promptkd.training.signals import Preempted, StopRequest, TrainingAborted

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Where the loop is (step, dev history, skip counters): checkpointed as "trainer"."""

    step: int = 0
    best_dev: Optional[float] = None
    history: list = field(default_factory=list)
    skipped_steps: int = 0         # non-finite steps skipped so far
    bad_in_a_row: int = 0
    evals_since_best: int = 0      # dev evaluations since the last new best (early stopping)

    def state_dict(self) -> dict:
        return copy.deepcopy(vars(self))

    def load_state_dict(self, state: dict) -> None:
        fresh = LoopState(**copy.deepcopy(state))  # an unknown key is an error, as constructing one is
        vars(self).update(vars(fresh))


@dataclass
class Position:
    """Where the data stream is: checkpointed as "sampler"."""

    epoch: int = 0
    batch_in_epoch: int = 0        # micro-batches already consumed in ``epoch``


class MicroBatches:
    """Endless, resumable stream of per-rank micro-batches over epochs; it owns (and saves) its position."""

    def __init__(self, data: list[TokenizedExample], batch_size: int, seed: int,
                 position: Optional[Position] = None):
        self.sampler = DistributedSampler(ListDataset(data), num_replicas=dist.world_size(), rank=dist.rank(),
                                          shuffle=True, seed=seed, drop_last=False)
        self.loader = DataLoader(ListDataset(data), batch_size=batch_size, sampler=self.sampler,
                                 collate_fn=list, num_workers=0)
        self.position = position or Position()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[list[TokenizedExample]]:
        pos = self.position
        while True:
            self.sampler.set_epoch(pos.epoch)
            for i, batch in enumerate(self.loader):
                if i < pos.batch_in_epoch:
                    continue  # resuming mid-epoch
                pos.batch_in_epoch = i + 1
                yield batch
            pos.epoch += 1
            pos.batch_in_epoch = 0

    def state_dict(self) -> dict:
        return dict(vars(self.position))

    def load_state_dict(self, state: dict) -> None:
        self.position = Position(**state)


def epoch_micro_batches(n_examples: int, micro_batch_size: int) -> int:
    """Micro-batches per rank per epoch of ``MicroBatches`` (padded shards, last batch kept)."""
    return math.ceil(math.ceil(n_examples / dist.world_size()) / micro_batch_size)


DevEval = Callable[[int], dict[str, float]]


@dataclass
class Trainer:
    """The loop over optimizer steps, and what it checkpoints: ``checkpointed()`` names the objects."""

    cfg: Config
    run_dir: str
    method: Method
    train_data: list[TokenizedExample]
    total_steps: int
    dev_eval: Optional[DevEval] = None
    tokenizer: Any = None              # to log sampled responses as text and export best/
    logger: Optional[MetricsLogger] = None  # default: TensorBoard + metrics.jsonl in run_dir (opened lazily)
    state: LoopState = field(default_factory=LoopState)
    stop: StopRequest = field(default_factory=StopRequest)

    def __post_init__(self) -> None:
        self.batches = MicroBatches(self.train_data, self.cfg.train.micro_batch_size, self.cfg.seed)
        if self.logger is None:
            self.logger = MetricsLogger(self.run_dir, self.cfg.logging.tensorboard)

    def run(self) -> LoopState:
        cfg = self.cfg
        self.stop.install()
        stream = iter(self.batches)
        bar = self._progress_bar()
        fault = configured()
        try:
            while self.state.step < self.total_steps and not self.early_stopped():
                self._one_step([next(stream) for _ in range(cfg.train.grad_accum)], fault, bar)
                if cfg.output.save_interval and self.state.step % cfg.output.save_interval == 0 \
                        and self.state.step < self.total_steps:
                    self.save()
                if dist.any_true(self.stop.requested):  # every rank leaves at the same boundary
                    self.save()
                    raise Preempted(f"stopped by signal after step {self.state.step}")
        finally:
            if bar is not None:
                bar.close()
        return self.state

    def _one_step(self, micro: list, fault: Any, bar: Any) -> None:
        ctx = self.method.ctx
        hook = None if fault is None else before_step(fault, self.state.step + 1, ctx.engine.module)
        start = time.perf_counter()
        try:
            result = self.method.step(micro, self.state.step)
        finally:
            if hook is not None:
                hook.remove()
        seconds = time.perf_counter() - start
        self.state.step += 1
        self._count_skips(result.skipped)
        phases = ctx.timer.pop()
        if bar is not None:
            bar.update(1)
        if self._logging_step():
            # the step's metrics leave the device only here: one collective on every rank, logging steps only
            metrics = result.reduce()
            metrics["train/skipped_steps"] = float(self.state.skipped_steps)
            if bar is not None:
                bar.set_postfix_str(format_scalars(metrics, self.method.shown_keys()))
            self._log(metrics, seconds, phases, result)
        self._maybe_dev_eval()

    def _logging_step(self) -> bool:
        """logging.interval steps and the last one (the same on every rank)."""
        step = self.state.step
        return step % self.cfg.logging.interval == 0 or step == self.total_steps

    def _count_skips(self, skipped: bool) -> None:
        if not skipped:
            self.state.bad_in_a_row = 0
            return
        self.state.skipped_steps += 1
        self.state.bad_in_a_row += 1
        log.warning("step %d: non-finite loss or gradient, update skipped on every rank (%d in a row)",
                    self.state.step, self.state.bad_in_a_row)
        limit = self.cfg.train.max_bad_steps
        if limit and self.state.bad_in_a_row >= limit:
            raise TrainingAborted(f"train.max_bad_steps: {limit} consecutive steps had a non-finite loss or "
                                  f"gradient (last at step {self.state.step}); aborting")

    def _progress_bar(self):
        if not (self.cfg.logging.progress_bar and dist.is_main()):
            return None
        from tqdm import tqdm

        import sys

        # redraw rarely when stderr is a log file, not a terminal
        interval = 0.1 if sys.stderr.isatty() else 30.0
        return tqdm(total=self.total_steps, initial=self.state.step, desc=self.cfg.method.name, dynamic_ncols=True,
                    mininterval=interval)

    def _log(self, metrics: dict[str, float], seconds: float, phases: dict[str, float], result: StepResult) -> None:
        step, ctx = self.state.step, self.method.ctx
        values = dict(metrics)
        values["student/lr"] = float(ctx.engine.get_lr()[0])
        norm = ctx.engine.get_global_grad_norm()
        if norm is not None:
            values["student/grad_norm"] = float(norm)
        values["perf/step_seconds"] = seconds
        tokens = result.global_tokens()
        if tokens is not None:  # a method that counts no tokens logs no throughput (not a rate of 0)
            values["perf/tokens_per_second"] = tokens / max(seconds, 1e-9)
        values.update({f"time/{k}": v for k, v in phases.items()})
        self.logger.scalars(step, values)
        self._log_samples(step, result.rollouts)
        if not self.cfg.logging.progress_bar:
            log.info("step %d/%d %s", step, self.total_steps, format_scalars(values))

    def _log_samples(self, step: int, rollouts: list) -> None:
        n = self.cfg.logging.sample_texts
        if not rollouts or not n or not dist.is_main():
            return
        tok = self.tokenizer
        if tok is None:
            return
        r = rollouts[0]
        texts = []
        for row, mask in zip(r.input_ids[:n], r.loss_mask[:n]):
            prompt = tok.decode(row[:r.prompt_len], skip_special_tokens=True)
            answer = tok.decode(row[mask.bool()], skip_special_tokens=True)
            texts.append(f"**prompt** {prompt.strip()[-200:]}\n\n**response** {answer}")
        self.logger.text(step, "rollout/samples", "\n\n---\n\n".join(texts))

    def early_stopped(self) -> bool:
        """``train.early_stop_patience`` dev evaluations in a row brought no new best (same on every rank)."""
        patience = self.cfg.train.early_stop_patience
        return bool(patience and self.dev_eval is not None and self.state.evals_since_best >= patience)

    def _maybe_dev_eval(self) -> None:
        """Dev ROUGE-L every eval.dev_interval steps and/or at the end of every eval.dev_interval_epochs-th epoch."""
        if self.dev_eval is None:
            return
        interval, epochs = self.cfg.eval.dev_interval, self.cfg.eval.dev_interval_epochs
        if (interval and self.state.step % interval == 0) or (epochs and self._ended_epoch(epochs)):
            self.run_dev_eval()

    def _ended_epoch(self, every: int) -> bool:
        """Whether the step just taken consumed the last micro-batch of an ``every``-th epoch.

        The micro-batch counters of the loop state and the epoch length are equal on every
        rank (DistributedSampler pads the shards), so every rank decides the same, with no collective.
        An optimizer step may span an epoch boundary (accumulation); the epoch counts as ended
        at the step that holds its last micro-batch.
        """
        per_epoch = epoch_micro_batches(len(self.train_data), self.cfg.train.micro_batch_size)
        if not per_epoch:
            return False
        pos = self.batches.position
        done = pos.epoch * per_epoch + pos.batch_in_epoch  # micro-batches consumed so far
        span = every * per_epoch
        return done // span > (done - self.cfg.train.grad_accum) // span

    def run_dev_eval(self) -> float:
        result = self.dev_eval(self.state.step)
        self.logger.scalars(self.state.step, {f"dev/{k}": v for k, v in result.items()})
        self.state.history.append({"step": self.state.step, **result})
        self.state.evals_since_best += 1
        if self.state.best_dev is None or result["rougeL"] > self.state.best_dev:
            self.state.best_dev = result["rougeL"]
            self.state.evals_since_best = 0
            # best/: the student export + what the method exports beside it, next to checkpoints/
            checkpoint.save_best(self.run_dir, self.state.step, result["rougeL"], self.method.ctx.engine,
                                 self.tokenizer, extra=self.method.export)
        log.info("dev @ step %d: %s", self.state.step, format_scalars(result))
        if self.early_stopped():
            log.info("early stop at step %d: %d dev evaluations without a new best (best %.2f)", self.state.step,
                     self.state.evals_since_best, self.state.best_dev)
        return result["rougeL"]

    def export(self, out_dir: str) -> None:
        """The student in HF format, and whatever the method exports beside it (e.g. its learned prompt)."""
        checkpoint.export_student(self.method.ctx.engine, self.tokenizer, out_dir, extra=self.method.export)
        log.info("exported to %s", out_dir)

    def checkpointed(self) -> dict[str, checkpoint.Stateful]:
        """What a checkpoint holds beside the engine, by name: the same on every rank (``state.pt``)."""
        return {"trainer": self.state, "method": self.method, "sampler": self.batches}

    def rank_checkpointed(self) -> dict[str, checkpoint.Stateful]:
        """Each rank's own (``rank_<r>.pt``): its RNGs and its rollout generator."""
        return {"rng": checkpoint.ProcessRNG(), "generator": checkpoint.GeneratorState(self.method.ctx.generator)}

    def save(self) -> str:
        return checkpoint.save(self.run_dir, self.state.step, self.method.ctx.engine, self.checkpointed(),
                               self.rank_checkpointed(), keep_last=self.cfg.output.keep_last,
                               tokenizer=self.tokenizer)

    def restore(self, path: str) -> None:
        """Continue from the checkpoint at ``path``; the metrics logger then drops the points the interrupted run
        logged after it (they are logged again)."""
        checkpoint.load(path, self.method.ctx.engine, self.checkpointed(), self.rank_checkpointed())
        if isinstance(self.logger, MetricsLogger):
            self.logger.resume_at(self.state.step + 1)
