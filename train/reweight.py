"""Online reweighting: a task's source weights move during training, from the per-source training losses.

A task's `reweight:` block in the mixture manifest selects a policy:

  exp3    the bandit of ODM (Albalak et al., 2023): each source is an arm whose reward is its training loss,
          importance-weighted by its current weight and smoothed; weights are (1 - K eps) softmax(eta eps R) + eps
          with eps = min(1/K, sqrt(ln K / (K t))). Sources the model still finds hard get more data.
  doremi  DoReMi's excess-loss rule (Xie et al., 2023) without a proxy model: a source's excess loss is its
          training loss minus a reference run's loss for it at the same step (`reference:` names that run's
          metrics.jsonl), floored at 0; log-weights grow by eta x excess. Sources the run learns slower than
          the reference get more data; an unlearnable source (its reference loss is as high) does not.

Both then pass the target through one projection: every weight at least `floor`, no weight moving by more
than `max_change` in one update (the floor wins when both cannot hold), the weights summing to 1. No update
happens before `warmup` steps; then one after every `every` steps, from the mean per-source losses of those steps.

Timing (the lag): the trainer's loader plans batches ahead in a background thread (and DataLoader workers), so
an update computed after trainer step s applies from trainer step s + 1 + lag, whatever the timing: the loader
waits for that update before planning that step, and plans up to `lag` steps ahead of the trainer without it.
`every`, `warmup` and `lag` count trainer (optimizer) steps; with `grad_accum` K each trainer step takes K loader
steps (global batches), the window holds the losses of all their micro-steps, and the update after trainer step s
applies from loader step (s + lag) x K, the first micro-step of trainer step s + 1 + lag.

Determinism: the losses the policy sees are reduced over all ranks per document (`train.metrics.StepMeter`:
each document's summed loss, summed once with `math.fsum`), so every rank holds the same floats whatever the
split of the batch, and `update` is a pure function of the policy state and those numbers, so every rank
computes the same weights. The policy state, the window of losses since the last update and the history of
(update step, apply step, weights) are saved with each checkpoint; resuming republishes the history to the
loader, so the batches and the weight trajectory continue exactly. On another number of ranks the batches and
every update already computed continue exactly too, and the first step's losses are the same floats (the
reduction does not depend on the split, and a document's loss does not depend on its row); but the model
then trains differently (each rank's loss is normalised over its own targets and DeepSpeed averages the
ranks' gradients), so later losses, and the updates computed from them, follow the new run. Weights move the
sampler's shares only: each source's cursor is untouched, so no source repeats or skips a sample within its epoch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from synergen.errors import ConfigMismatchError, ManifestError, SynergenError

log = logging.getLogger(__name__)


class ReweightSpec(BaseModel):
    """A task's online reweighting: the policy and its limits (steps are trainer steps)."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["exp3", "doremi"]
    every: int = Field(default=10, ge=1)  # steps between updates
    warmup: int = Field(default=0, ge=0)  # steps before the first window starts
    lag: int = Field(default=2, ge=0)  # an update after step s applies from step s + 1 + lag
    floor: float = Field(default=0.02, ge=0, lt=1)  # no weight below this
    max_change: float = Field(default=0.1, gt=0, le=1)  # no weight moves by more than this in one update
    eta: float = Field(default=1.0, gt=0)  # step size
    smoothing: float = Field(default=0.9, ge=0, lt=1)  # exp3: moving average of the rewards
    reference: str | None = None  # doremi: the reference run's metrics.jsonl (per-source losses `source_loss/NAME`)

    @model_validator(mode="after")
    def _reference(self) -> "ReweightSpec":
        if self.policy == "doremi" and not self.reference:
            raise ValueError("policy doremi needs `reference:` (metrics.jsonl of a reference run on this mixture)")
        return self

    def update_steps(self, grad_accum: int = 1) -> "UpdateSchedule":
        return UpdateSchedule(self.warmup, self.every, self.lag, grad_accum)


class UpdateSchedule:
    """After which trainer steps an update is computed, and from which loader step it applies (a trainer step
    takes `grad_accum` loader steps)."""

    def __init__(self, warmup: int, every: int, lag: int, grad_accum: int = 1):
        self.warmup, self.every, self.lag, self.grad_accum = warmup, every, lag, grad_accum

    def is_update(self, step: int) -> bool:
        """Is an update computed after trainer step `step` (1-based)?"""
        return step > self.warmup and (step - self.warmup) % self.every == 0

    def applies_at(self, step: int) -> int:
        """The loader step (0-based) an update after trainer step `step` (1-based) applies from: the first of
        trainer step step + 1 + lag, whose loader steps are (step + lag) x grad_accum onwards."""
        return (step + self.lag) * self.grad_accum

    def latest_update_for(self, loader_step: int) -> int | None:
        """The trainer step whose update is in force at `loader_step` (None: the starting weights)."""
        i = (loader_step // self.grad_accum - self.lag - self.warmup) // self.every
        return self.warmup + i * self.every if i >= 1 else None


# ---- the policies: pure functions of (state, reduced losses) ------------------------------------------


def initial_state(weights: dict[str, float]) -> dict:
    """A policy's state before its first update: the starting weights, rewards / log-weights, no update yet."""
    return {"weights": dict(weights), "score": {n: 0.0 for n in weights},
            "log_alpha": {n: math.log(w) for n, w in weights.items()}, "updates": 0}


def project(target: dict[str, float], prev: dict[str, float], floor: float, max_change: float) -> dict[str, float]:
    """The weights closest to `target` (a shift by one constant, then clipped) with w >= floor, |w - prev| <= max_change
    and sum 1; when the floor and the cap cannot both hold (a weight far below the floor), the cap gives way."""
    names = list(target)
    lo = {n: max(floor, prev[n] - max_change) for n in names}
    hi = {n: max(lo[n], min(1.0, prev[n] + max_change)) for n in names}
    if sum(lo.values()) > 1 or sum(hi.values()) < 1:
        lo, hi = {n: floor for n in names}, {n: 1.0 for n in names}

    def total(shift: float) -> float:
        return sum(min(hi[n], max(lo[n], target[n] + shift)) for n in names)

    a, b = -1.0 - max(target.values()), 1.0 + max(abs(v) for v in target.values())
    for _ in range(100):  # bisection on the shift: deterministic, exact to float resolution
        mid = (a + b) / 2
        if total(mid) < 1:
            a = mid
        else:
            b = mid
    return {n: min(hi[n], max(lo[n], target[n] + b)) for n in names}


def _softmax(x: dict[str, float]) -> dict[str, float]:
    top = max(x.values())
    e = {n: math.exp(v - top) for n, v in x.items()}
    s = sum(e.values())
    return {n: v / s for n, v in e.items()}


def update(spec: ReweightSpec, state: dict, losses: dict[str, float], reference: dict[str, float] | None = None) -> dict:
    """The policy's next state (its `weights` are the new weights) from the mean per-source losses of the window.

    A source with no loss in the window (it drew no sample) keeps its reward / log-weight. Pure: no clock, no
    randomness, no I/O; the same state and numbers give the same floats on every rank and after a resume."""
    prev = state["weights"]
    names = list(prev)
    k = len(names)
    score, log_alpha = dict(state["score"]), dict(state["log_alpha"])
    t = state["updates"] + 1
    if spec.policy == "exp3":
        for n in names:
            if n in losses:
                score[n] = spec.smoothing * score[n] + (1 - spec.smoothing) * losses[n] / max(prev[n], 1e-12)
        eps = min(1.0 / k, math.sqrt(math.log(k) / (k * t))) if k > 1 else 0.0
        soft = _softmax({n: spec.eta * eps * score[n] for n in names})
        target = {n: (1 - k * eps) * soft[n] + eps for n in names}
    else:
        for n in names:
            if n in losses:
                log_alpha[n] += spec.eta * max(losses[n] - reference[n], 0.0)
        target = _softmax(log_alpha)
    weights = project(target, prev, spec.floor, spec.max_change)
    return {"weights": weights, "score": score, "log_alpha": log_alpha, "updates": t}


class ReferenceLosses:
    """A reference run's per-source losses by step (`source_loss/NAME` of its metrics.jsonl), for doremi."""

    def __init__(self, path: str, sources: list[str]):
        from train.metrics import read_metrics

        if not Path(path).exists():
            raise ManifestError(f"reweight reference {path} does not exist; point `reference:` at the metrics.jsonl of an "
                                "earlier run on this mixture (e.g. with static weights)")
        self.path = path
        self.by_source: dict[str, list[tuple[int, float]]] = {n: [] for n in sources}
        for r in read_metrics(Path(path)):
            for n in sources:
                v = r.get(f"source_loss/{n}")
                if v is not None:
                    self.by_source[n].append((int(r["step"]), float(v)))
        empty = [n for n, v in self.by_source.items() if not v]
        if empty:
            raise ManifestError(f"reweight reference {path}: no `source_loss/` for sources {empty}; the reference run must "
                                "train on every source of the task")

    def at(self, step: int, every: int) -> dict[str, float]:
        """Each source's mean reference loss over the steps (step - every, step]; else its latest before; else its first."""
        out = {}
        for n, rows in self.by_source.items():
            window = [v for s, v in rows if step - every < s <= step]
            before = [v for s, v in rows if s <= step]
            out[n] = sum(window) / len(window) if window else (before[-1] if before else rows[0][1])
        return out


# ---- the channel from the trainer to the loader's planners (threads and worker processes) ---------------


class OnlineWeights:
    """The weights in force at each loader step for the tasks that reweight online, as the planners read them.

    Updates travel through a local folder (one small JSON file per update, written atomically), which the
    trainer's prefetch thread and DataLoader worker processes alike can read. A planner at a step where an
    update applies waits until the trainer has published it: that wait is what makes the lag exact.
    `grad_accum` (loader steps per trainer step) is set by the trainer (`ReweightHook.attach`) before iterating."""

    POLL_S = 0.002

    def __init__(self, initial: dict[str, dict[str, float]], specs: dict[str, ReweightSpec], folder: str | None = None):
        self.initial = initial
        self.specs = specs
        self.tasks = tuple(specs)
        self.grad_accum = 1
        self.folder = folder or tempfile.mkdtemp(prefix="synergen-reweight-")
        self._cache: dict[tuple[str, int], dict[str, float]] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": {}}

    def _file(self, task: str, step: int) -> str:
        return os.path.join(self.folder, f"{task}.{step:010d}.json")

    def publish(self, task: str, update_step: int, weights: dict[str, float]) -> None:
        """Make the update computed after trainer step `update_step` visible to every planner."""
        path = self._file(task, update_step)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(weights, f)
        os.replace(tmp, path)

    def close(self) -> None:
        """The trainer is done: remove the folder; planners waiting for an update stop instead of waiting forever."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def weights(self, task: str, loader_step: int) -> dict[str, float]:
        s = self.specs[task].update_steps(self.grad_accum).latest_update_for(loader_step)
        if s is None:
            return self.initial[task]
        key = (task, s)
        if key not in self._cache:
            path, waited, warned = self._file(task, s), 0.0, 60.0
            while not os.path.exists(path):
                if not os.path.isdir(self.folder):
                    raise SynergenError(f"task {task}: the reweight update after step {s} was never published (training ended)")
                time.sleep(self.POLL_S)
                waited += self.POLL_S
                if waited > warned:
                    log.warning("loader step %d waits %.0f s for the %s reweight update after trainer step %d", loader_step,
                                waited, task, s)
                    warned *= 2
            with open(path) as f:
                self._cache[key] = json.load(f)
        return self._cache[key]


# ---- the trainer's side -------------------------------------------------------------------------------


class ReweightHook:
    """Feeds each step's reduced per-source losses to the policies and publishes their updates to the loader."""

    def __init__(self, online: OnlineWeights):
        self.online = online
        self.specs = online.specs
        self.reference = {t: ReferenceLosses(s.reference, list(online.initial[t])) for t, s in self.specs.items()
                          if s.policy == "doremi"}
        self.policy = {t: initial_state(online.initial[t]) for t in self.specs}
        self.window: dict[str, dict[str, list[float]]] = {t: {} for t in self.specs}
        self.history: dict[str, list[list]] = {t: [] for t in self.specs}  # [update step, applies at loader step, weights]
        self.seconds = 0.0  # time the last after_step took (the policies' overhead on that step)

    @classmethod
    def attach(cls, data, grad_accum: int) -> "ReweightHook | None":
        """The hook for the trainer's data when its manifest reweights online (else None); tells the loader's
        weight channel how many loader steps make a trainer step (call it before iterating the data)."""
        dataset = getattr(getattr(data, "loader", None), "dataset", None)
        online = getattr(dataset, "online", None)
        if online is None:
            return None
        online.grad_accum = grad_accum
        return cls(online)

    def after_step(self, step: int, source_loss: dict[str, list[float]]) -> dict[str, dict[str, float]]:
        """Add trainer step `step`'s losses ({source: [sum, n]}, summed over ranks and its micro-steps) to the window;
        update where due.
        Returns the tasks updated and their new weights."""
        t0 = time.perf_counter()
        done = {}
        for task, spec in self.specs.items():
            if step <= spec.warmup:  # the first window starts after the warm-up
                continue
            win = self.window[task]
            for n in self.policy[task]["weights"]:
                if n in source_loss and source_loss[n][1] > 0:
                    acc = win.setdefault(n, [0.0, 0.0])
                    acc[0] += source_loss[n][0]
                    acc[1] += source_loss[n][1]
            sched = spec.update_steps(self.online.grad_accum)
            if not sched.is_update(step):
                continue
            losses = {n: s / c for n, (s, c) in win.items() if c > 0}
            ref = self.reference[task].at(step, spec.every) if task in self.reference else None
            self.policy[task] = update(spec, self.policy[task], losses, ref)
            weights = self.policy[task]["weights"]
            self.history[task].append([step, sched.applies_at(step), weights])
            self.online.publish(task, step, weights)
            self.window[task] = {}
            done[task] = weights
            log.info("reweight %s after step %d (applies from step %d, loader step %d): %s", task, step, step + 1 + spec.lag,
                     sched.applies_at(step), {n: round(w, 4) for n, w in weights.items()})
        self.seconds = time.perf_counter() - t0
        return done

    def state(self) -> dict:
        return json.loads(json.dumps({"policy": self.policy, "window": self.window, "history": self.history,
                                      "grad_accum": self.online.grad_accum}))

    def load(self, state: dict | None, step: int) -> None:
        """Continue after trainer step `step` from a checkpoint's state: republish its updates (applied and pending).

        A checkpoint without a policy state (saved before the manifest reweighted) starts the policy at the
        starting weights; the updates the loader would wait for (update steps up to `step`) then carry those.
        The run must keep its `grad_accum`: the loader's steps map to trainer steps, and so to updates, by it."""
        saved = (state or {}).get("grad_accum", 1)  # states saved before grad_accum was allowed had 1
        if state and saved != self.online.grad_accum:
            raise ConfigMismatchError(f"the checkpoint at step {step} reweights online with grad_accum {saved} but the config "
                                      f"has {self.online.grad_accum}: the loader would apply its updates at other steps; "
                                      f"resume with grad_accum: {saved}")
        for task, spec in self.specs.items():
            if state and task in state.get("policy", {}):
                self.policy[task] = state["policy"][task]
                self.window[task] = state["window"].get(task, {})
                self.history[task] = state["history"].get(task, [])
            done = {h[0] for h in self.history[task]}
            for s, _, weights in self.history[task]:
                self.online.publish(task, s, weights)
            sched = spec.update_steps()
            for s in range(max(1, step - spec.lag - spec.every), step + 1):
                if sched.is_update(s) and s not in done:
                    self.online.publish(task, s, self.policy[task]["weights"])

    def close(self) -> None:
        self.online.close()
