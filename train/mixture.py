"""Mixture manifests (`manifests/mixtures/*.yaml`) and the sampler that realises them per global batch.

A manifest says, per task (`und`, `gen`), how many samples one global batch holds (Table 8: equal
per-task batches), in which unit the source weights count (`samples` or `tokens`) and how the weights
are set: explicit numbers, `natural` (by size) or `temperature` (size ** alpha). A `schedule` changes
explicit weights from a step on; the loader keeps each source's cursor across such changes, so a
source never repeats a sample within its epoch because the weights moved.

The loader fills each global batch by worst-case weighted fair queueing over the whole run
(`merge_by_credit`): the next sample comes from the source, among those owed something, whose next
sample would finish first,
and each source's credit (what it is owed) is carried from batch to batch in the loader state
(`MixLedger`). In tokens, a 4,096-code image and a 20-token caption are weighed by what they cost;
every source's share of each batch, and its cumulative share of the run at every step, is met to
within one sample (or one sample's tokens), including across weight changes, resume and world sizes.

Weights can also move during training: a task's `reweight:` block selects a policy of `train.reweight`
(online reweighting from the per-source training losses).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.netguard import drop_redacted
from synergen.errors import ManifestError, ShardError, explain_validation
from train.mix_config import MixConfig
from train.reweight import ReweightSpec

log = logging.getLogger(__name__)

TASKS = ("und", "gen")


class SourceSpec(BaseModel):
    """One source of a task: the catalog(s) that list its shards and its weight."""

    model_config = ConfigDict(extra="forbid")

    catalogs: list[str] = Field(min_length=1)  # catalog files or folders; relative ones resolve against data_root
    select: str | None = None  # keep only catalog rows of this `source` (catalogs may hold several sources)
    weight: float | None = Field(default=None, ge=0)  # explicit weight; required when the task's weighting is explicit


class TaskSpec(BaseModel):
    """What one task's share of every global batch is made of."""

    model_config = ConfigDict(extra="forbid")

    global_batch: int = Field(gt=0)  # samples of this task per global batch (Table 8: 6,988 in S.1, 5,090 in S.2)
    unit: Literal["samples", "tokens"] = "samples"  # what the weights count
    weighting: Literal["explicit", "natural", "temperature"] = "explicit"
    alpha: float = Field(default=0.5, gt=0, le=1)  # temperature exponent: weight = size ** alpha
    sources: dict[str, SourceSpec] = Field(min_length=1)
    reweight: ReweightSpec | None = None  # online reweighting from the training losses (train.reweight)

    @model_validator(mode="after")
    def _weights_present(self) -> "TaskSpec":
        if self.reweight is not None and self.reweight.floor * len(self.sources) > 1:
            raise ValueError(f"reweight.floor {self.reweight.floor} x {len(self.sources)} sources is more than 1; lower the floor")
        if self.weighting == "explicit":
            missing = [n for n, s in self.sources.items() if s.weight is None]
            if missing:
                raise ValueError(f"sources {missing} have no `weight`; give one or set `weighting: natural`")
            if sum(s.weight for s in self.sources.values()) <= 0:
                raise ValueError("all weights are 0; give at least one source a positive weight")
        return self


class ScheduleEntry(BaseModel):
    """From `at_step` on, these explicit weights replace the named sources' weights (others keep theirs)."""

    model_config = ConfigDict(extra="forbid")

    at_step: int = Field(gt=0)
    weights: dict[str, dict[str, float]]  # task -> source -> weight


class MixtureManifest(BaseModel):
    """A stage's data mixture: tasks, sources, weights, sequence layout, and an optional weight schedule."""

    model_config = ConfigDict(extra="forbid")

    name: str
    stage: str = "1"
    data_root: str = ""  # relative catalog paths resolve against it (a local path or s3://...)
    seq_len: int = Field(default=4096, gt=8)  # Table 8: 4,096 in S.1, 8,192 in S.2
    max_tiles: int = Field(default=1, ge=1)  # Table 8: 1 in S.1, 6 in S.2
    thumbnail: bool = False  # Table 8: no in S.1, yes in S.2
    uncond_prob: float = Field(default=0.10, ge=0, le=1)  # CFG prompt drop for generation samples (paper §4.1)
    tasks: dict[Literal["und", "gen"], TaskSpec] = Field(min_length=1)
    schedule: list[ScheduleEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _schedule_names(self) -> "MixtureManifest":
        steps = [e.at_step for e in self.schedule]
        if steps != sorted(set(steps)):
            raise ValueError(f"schedule steps {steps} must be strictly increasing")
        for e in self.schedule:
            for task, ws in e.weights.items():
                if task not in self.tasks:
                    raise ValueError(f"schedule at step {e.at_step}: unknown task {task!r} (have {list(self.tasks)})")
                unknown = set(ws) - set(self.tasks[task].sources)
                if unknown:
                    raise ValueError(f"schedule at step {e.at_step}: unknown sources {sorted(unknown)} in task {task!r}")
                if self.tasks[task].reweight is not None:
                    raise ValueError(f"schedule at step {e.at_step}: task {task!r} reweights online; drop its schedule entries "
                                     "or its `reweight:` block")
                if self.tasks[task].weighting != "explicit":
                    raise ValueError(f"schedule at step {e.at_step}: task {task!r} uses {self.tasks[task].weighting} weights; "
                                     "a schedule needs `weighting: explicit`")
        return self

    @classmethod
    def load(cls, url: str, data_root: str | None = None) -> "MixtureManifest":
        """Read and validate a manifest (local path or fsspec URL); `data_root` overrides the file's."""
        import fsspec

        try:
            with fsspec.open(url, "r") as f:
                raw = yaml.safe_load(f)
        except FileNotFoundError:
            raise ManifestError(f"mixture manifest {url} does not exist; see manifests/mixtures/ for examples") from None
        try:
            manifest = cls.model_validate(raw)
        except ValidationError as e:
            raise ManifestError(explain_validation(e, cls, url, "mixture manifest")) from None
        if data_root is not None:
            manifest = manifest.model_copy(update={"data_root": data_root})
        return manifest

    @property
    def fingerprint(self) -> str:
        """Identifies the manifest's content (recorded in the loader state)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def segment(self, step: int) -> int:
        """Index of the schedule segment in force at `step` (0 = the base weights)."""
        return sum(1 for e in self.schedule if e.at_step <= step)

    def mixture_id(self, step: int) -> str:
        return f"{self.name}@{self.fingerprint}#{self.segment(step)}"

    def catalog_urls(self, source: SourceSpec) -> list[str]:
        out = []
        for c in source.catalogs:
            if "://" in c or c.startswith("/") or not self.data_root:
                out.append(c)
            else:
                out.append(f"{self.data_root.rstrip('/')}/{c}")
        return out

    def explicit_weights(self, task: str, step: int) -> dict[str, float]:
        """Explicit weights in force at `step` (only for `weighting: explicit`)."""
        spec = self.tasks[task]
        weights = {n: float(s.weight) for n, s in spec.sources.items()}
        for e in self.schedule:
            if e.at_step <= step:
                weights.update(e.weights.get(task, {}))
        return weights


@dataclass(frozen=True)
class SourceSize:
    """A source's size from its catalogs: samples and tokens (image positions + caption tokens)."""

    samples: int
    tokens: int


def resolve_weights(manifest: MixtureManifest, task: str, step: int, sizes: dict[str, SourceSize]) -> dict[str, float]:
    """Normalised weights of a task's sources at `step`; sources with weight 0 or no samples are left out."""
    spec = manifest.tasks[task]
    if spec.weighting == "explicit":
        raw = manifest.explicit_weights(task, step)
    else:
        size = {n: (sizes[n].tokens if spec.unit == "tokens" else sizes[n].samples) for n in spec.sources}
        raw = {n: float(v) ** (spec.alpha if spec.weighting == "temperature" else 1.0) if v > 0 else 0.0 for n, v in size.items()}
    raw = {n: w for n, w in raw.items() if w > 0 and sizes[n].samples > 0}
    total = sum(raw.values())
    if total <= 0:
        raise ManifestError(f"mixture {manifest.name!r}, task {task!r}: no source with a positive weight has any samples at "
                            f"step {step}; check the catalogs (run `synergen mix` to see sizes)")
    return {n: w / total for n, w in raw.items()}


class MixLedger:
    """Each source's running credit and cumulative draws, per task: the part of the loader state the sampler carries.

    Credit is what a source is owed, in the task's unit: after every global batch of total T (samples or
    tokens) each source with weight w gains w * T and pays for what it was given, so credit = sum over steps
    of w(step) * T(step) minus what it drew. Carrying it from batch to batch is what keeps every source's
    cumulative draw within one sample (or one sample's tokens) of its share for the whole run, through weight
    changes (schedule, online reweighting), resume and any number of ranks. Weights are kept with it only
    to be reported (metrics, `mix --run`); the planner reads them from the manifest or the weight channel.
    """

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, dict]] = {}  # task -> source -> {credit, samples, tokens, weight}

    def _entry(self, task: str, name: str) -> dict:
        return self.entries.setdefault(task, {}).setdefault(name, {"credit": 0.0, "samples": 0, "tokens": 0, "weight": 0.0})

    def credit(self, task: str, name: str) -> float:
        return float(self.entries.get(task, {}).get(name, {}).get("credit", 0.0))

    def advance(self, task: str, weights: dict[str, float], unit_cost: dict[str, int], samples: dict[str, int],
                tokens: dict[str, int]) -> None:
        """Book one global batch: `unit_cost[n]` units, `samples[n]` samples and `tokens[n]` tokens drawn from source n."""
        total = sum(unit_cost.values())
        for n, w in weights.items():
            e = self._entry(task, n)
            e["credit"] = e["credit"] + w * total - unit_cost.get(n, 0)
            e["samples"] += samples.get(n, 0)
            e["tokens"] += tokens.get(n, 0)
            e["weight"] = w
        for n, e in self.entries.get(task, {}).items():  # a source out of the mixture keeps its credit, at weight 0
            if n not in weights:
                e["weight"] = 0.0

    def state(self) -> dict:
        return {t: {n: dict(e) for n, e in es.items()} for t, es in self.entries.items()}

    def load(self, state: dict | None) -> None:
        self.entries = {t: {n: dict(e) for n, e in es.items()} for t, es in (state or {}).items()}


def merge_by_credit(costs: list[np.ndarray], weights: list[float], credits: list[float], batch: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A global batch by worst-case weighted fair queueing (WF2Q): (source index [n], row [n]) in batch order, where
    row is the sample's index in all candidates concatenated (source 0's, then source 1's, ...).

    `costs[i]` are the costs (1, or the sample's tokens) of source i's next candidates, `credits[i]` what it
    is owed. Before each pick, a source's credit is its carried credit plus weight x what the batch has
    drawn so far minus what it drew itself. Among the sources owed something (credit >= 0), the one whose
    next sample would finish first, (cost - credit) / weight, is served (ties to the source listed first).
    Serving only sources that are owed keeps each one from running ahead by more than one sample; serving
    the earliest finish keeps it from falling behind by more: the cumulative draw stays within one sample
    (or one sample's tokens) of weight x total, batch after batch. A source whose candidates run out is no
    longer served (the caller gathers more and merges again).

    Each pick depends on the ones before (it is non-preemptive earliest-deadline-first with release times,
    in the virtual time of what the batch has drawn), so the loop is sequential; what does not depend on the
    picks is computed once, vectorised: every candidate's release (the virtual time from which its source is
    owed it) and finish, from the prefix sums of its source's costs."""
    import heapq

    n = len(costs)
    sizes = [len(c) for c in costs]
    eps = 1e-9 * max(1.0, max((float(np.max(c)) for c in costs if len(c)), default=1.0))
    # candidate k of source i: its source has drawn S = costs[i][:k].sum() when it comes up; it is owed from virtual
    # time (S - credit) / weight on and finishes at (S + cost - credit) / weight (integer S: exact in float64)
    release, finish, cost = [], [], []
    for c, w, cr in zip(costs, weights, credits):
        drawn_before = np.concatenate([[0], np.cumsum(np.asarray(c, np.int64))]).astype(np.float64)
        release.append(((drawn_before[:-1] - cr - eps) / w).tolist())
        finish.append(((drawn_before[1:] - cr) / w).tolist())
        cost.append(np.asarray(c, np.float64).tolist())
    # sources wait in `later` (by release) until owed, then in `ready` (by finish, then list order): O(log n) per pick
    nxt = [0] * n
    later = [(release[i][0], i) for i in range(n) if sizes[i]]
    heapq.heapify(later)
    ready: list[tuple[float, int]] = []
    pop, push = heapq.heappop, heapq.heappush
    drawn = 0.0  # virtual time: what the batch has drawn
    out = []
    for _ in range(batch):
        while later and later[0][0] <= drawn:
            i = pop(later)[1]
            push(ready, (finish[i][nxt[i]], i))
        if ready:
            i = pop(ready)[1]
        elif later:  # none owed (credits of sources out of the mixture do not sum to 0): the one owed soonest
            i = pop(later)[1]
        else:
            break
        k = nxt[i]
        drawn += cost[i][k]
        out.append(i)
        nxt[i] = k + 1
        if k + 1 < sizes[i]:
            push(later, (release[i][k + 1], i))
    src = np.array(out, np.int64)
    return src, _rows_of_picks(src, sizes)


def _rows_of_picks(src: np.ndarray, sizes: list[int]) -> np.ndarray:
    """The j-th pick of source i is its candidate j: row = offset of source i in the concatenation + j."""
    n = len(sizes)
    counts = np.bincount(src, minlength=n)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    order = np.argsort(src, kind="stable")
    nth = np.empty(len(src), np.int64)
    nth[order] = np.arange(len(src)) - np.repeat(first, counts)
    offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return offset[src] + nth


# ---- the plan printed by `synergen mix` -------------------------------------------------------------------


@dataclass
class SourcePlan:
    """What a source gives over the planned steps; `usable` is the expected fraction of its samples that fit."""

    task: str
    source: str
    size: SourceSize
    samples: float = 0.0
    tokens: float = 0.0
    usable: float = 1.0
    missing: str = ""

    @property
    def epochs(self) -> float:
        """Passes over the source: drawn samples plus those passed over because they do not fit, over its size."""
        if not self.size.samples:
            return math.inf
        return self.samples / (self.size.samples * self.usable) if self.usable > 0 else math.inf


@dataclass(frozen=True)
class SourceLengths:
    """A source's size and, from its shards' indices, the loader's sequence lengths: mean length and fraction usable,
    expected over the `<UNCOND>` draw (generation samples lose their caption with the manifest's uncond_prob)."""

    size: SourceSize
    mean_length: float
    usable: float


def source_lengths(manifest: MixtureManifest, task: str, ids, storage_options: dict | None = None
                   ) -> tuple[dict[str, SourceLengths], dict[str, str]]:
    """Every source of a task, measured with the loader's own `train.sequence.plan_lengths` over its shard indices
    (the `.idx.npy` sidecars, else a scan of the tar); and the reason for each source that could not be read."""
    from model.folding import Fold
    from pipeline.token_shards import build_shard_index, read_shard_index
    from pipeline.catalog import read_catalog
    from train.sequence import VIEW_DROPPED, SequenceSpec, plan_lengths

    out, missing = {}, {}
    for name, src in manifest.tasks[task].sources.items():
        samples = tokens = 0
        total_len = total_ok = 0.0
        for url in manifest.catalog_urls(src):
            folder = url.rsplit("/", 1)[0] if url.endswith(".parquet") else url.rstrip("/")
            try:
                rows = [r for r in read_catalog(url, storage_options) if src.select is None or r["source"] == src.select]
                for r in rows:
                    shard = f"{folder}/{r['path']}"
                    index = read_shard_index(shard, storage_options)
                    if index is None:
                        import fsspec

                        with fsspec.open(shard, "rb", **(storage_options or {})) as f:
                            index = build_shard_index(f.read(), shard)
                    spec = SequenceSpec(manifest.seq_len, manifest.max_tiles, manifest.thumbnail, Fold.parse(r["fold"]))
                    p = manifest.uncond_prob if task == "gen" else 0.0
                    for drop, prob in ((False, 1 - p), (True, p)):
                        if prob <= 0:
                            continue
                        length, view = plan_lengths(index, task, np.full(len(index), drop), spec, ids)
                        ok = view != VIEW_DROPPED
                        total_len += prob * float(length[ok].sum())
                        total_ok += prob * float(ok.sum())
                    samples += int(r["samples"])
                    tokens += int(r["image_tokens"]) + int(r["text_tokens"])
            except (ShardError, FileNotFoundError) as e:
                missing[name] = str(e)
        size = SourceSize(samples, tokens)
        out[name] = SourceLengths(size, total_len / total_ok if total_ok else 0.0, total_ok / samples if samples else 0.0)
    return out, missing


def plan_mixture(manifest: MixtureManifest, steps: int, ids, storage_options: dict | None = None
                 ) -> tuple[list[SourcePlan], list[str]]:
    """Expected samples, tokens and epochs per source over `steps` loader steps (schedule included), and warnings.

    The loader meets every source's cumulative share to within one sample, so in samples the plan is the
    share times the steps' samples; in tokens a source's samples are its token share over its mean sequence
    length. Lengths are the loader's own (`source_lengths`), so the plan matches a run to well within 1% once
    sources have passed an epoch or so. Online reweighting (`reweight:`) is planned at the starting weights."""
    plans: list[SourcePlan] = []
    warnings: list[str] = []
    bounds = [0, *[e.at_step for e in manifest.schedule if e.at_step < steps], steps]
    for task, spec in manifest.tasks.items():
        lengths, missing = source_lengths(manifest, task, ids, storage_options)
        sizes = {n: lengths[n].size for n in spec.sources}
        by_name = {n: SourcePlan(task, n, sizes[n], usable=lengths[n].usable, missing=missing.get(n, "")) for n in spec.sources}
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if hi <= lo:
                continue
            try:
                weights = resolve_weights(manifest, task, lo, sizes)
            except ManifestError as e:
                warnings.append(str(e))
                continue
            weights = {n: w for n, w in weights.items() if lengths[n].usable > 0}
            avg = {n: lengths[n].mean_length for n in weights}
            if spec.unit == "samples":
                per_step = {n: spec.global_batch * w / sum(weights.values()) for n, w in weights.items()}
            else:  # token shares w_n: samples n_n proportional to w_n / avg_n, summing to the batch
                denom = sum(w / avg[n] for n, w in weights.items())
                per_step = {n: spec.global_batch * (w / avg[n]) / denom for n, w in weights.items()}
            for n, k in per_step.items():
                by_name[n].samples += k * (hi - lo)
                by_name[n].tokens += k * avg[n] * (hi - lo)
        plans.extend(by_name.values())
    return plans, warnings


def plan_manifest(url: str, steps: int, tokenizer_dir: str | None, data_root: str | None = None
                  ) -> tuple[MixtureManifest, list[SourcePlan], list[str]]:
    """`synergen mix MIXTURE`: load the manifest and plan it over `steps` with the tokenizer's prompt lengths."""
    manifest = MixtureManifest.load(url, data_root=data_root)
    plans, warnings = plan_mixture(manifest, steps, run_layout_ids(tokenizer_dir))
    return manifest, plans, warnings


def plan_warnings(plans: list[SourcePlan], max_epochs: float) -> list[str]:
    out = []
    for p in plans:
        if p.missing:
            out.append(f"{p.task}/{p.source}: catalog missing ({p.missing})")
        elif p.size.samples == 0:
            out.append(f"{p.task}/{p.source}: empty (its catalogs list no samples); it is left out of the mixture")
        elif p.usable == 0:
            out.append(f"{p.task}/{p.source}: no sample fits the sequence length; it is left out of the mixture")
        elif p.epochs > max_epochs:
            out.append(f"{p.task}/{p.source}: will repeat {p.epochs:.1f} times (more than {max_epochs:g} epochs); "
                       "lower its weight or add data")
    return out


@dataclass
class SourceRealised:
    """A source's plan beside what a run's loader drew (from the run's last metrics record with a mixture report)."""

    plan: SourcePlan
    samples: int
    tokens: int
    epochs: float


def compare_run(run_dir: str) -> tuple[list[SourceRealised], int, MixtureManifest, "Path"]:
    """Plan the run's mixture over the loader steps it trained and set the realised draws beside it.

    Reads `RUN/train_config.yaml` (mixture, data_root, tokenizer) and `RUN/metrics.jsonl`; plots planned vs
    realised to `RUN/mix_plan_vs_run.png`; returns the rows, the loader steps compared, the manifest and the plot."""
    from pathlib import Path

    from train.config import TrainConfig
    from train.metrics import read_metrics

    run = Path(run_dir)
    cfg_path, metrics_path = run / "train_config.yaml", run / "metrics.jsonl"
    for p in (cfg_path, metrics_path):
        if not p.exists():
            raise ManifestError(f"{p} does not exist; --run takes the output folder of a `synergen train` run")
    cfg = TrainConfig.load(str(cfg_path))
    records = [r for r in read_metrics(metrics_path) if r.get("mixture", {}).get("cumulative")]
    if not records:
        raise ManifestError(f"{metrics_path} has no step with the loader's cumulative mixture report; "
                            "it was written by an older synergen, rerun the training")
    last = records[-1]
    loader_steps = int(last["step"]) * cfg.grad_accum
    manifest = MixtureManifest.load(cfg.mixture, data_root=cfg.data_root)
    # the run folder's config has its credentials redacted: this process reads with its own
    plans, _ = plan_mixture(manifest, loader_steps, run_layout_ids(cfg.tokenizer),
                            drop_redacted(cfg.data_options.storage_options))
    cum, cursors = last["mixture"]["cumulative"], last["mixture"]["sources"]
    rows = []
    for p in plans:
        got = cum.get(p.task, {}).get(p.source, {"samples": 0, "tokens": 0})
        cur = cursors.get(p.source, {"epoch": 0, "pos": 0})
        epochs = cur["epoch"] + cur["pos"] / p.size.samples if p.size.samples else 0.0
        rows.append(SourceRealised(p, int(got["samples"]), int(got["tokens"]), epochs))
    from synergen.demo.report import plot_plan_vs_run

    return rows, loader_steps, manifest, plot_plan_vs_run(rows, run / "mix_plan_vs_run.png")


@dataclass
class MixReport:
    """What `synergen mix` shows: the plan per source over `steps` loader steps, beside a run's draws (`realised`,
    with the plot) when it compares a run, and the warnings."""

    manifest: MixtureManifest
    steps: int
    plans: list[SourcePlan]
    warnings: list[str]
    realised: list[SourceRealised] | None = None
    plot: Any = None  # the planned-vs-realised PNG of a compared run


def mix_report(cfg: MixConfig) -> MixReport:
    """`synergen mix`: a manifest planned over `cfg.steps`, or (`cfg.run`) a run's plan beside its realised draws."""
    if cfg.run is not None:
        rows, steps, manifest, png = compare_run(cfg.run)
        plans = [r.plan for r in rows]
        return MixReport(manifest, steps, plans, plan_warnings(plans, cfg.max_epochs), rows, png)
    manifest, plans, warnings = plan_manifest(cfg.mixture, cfg.steps, cfg.tokenizer, cfg.data_root)
    return MixReport(manifest, cfg.steps, plans, warnings + plan_warnings(plans, cfg.max_epochs))


def run_layout_ids(tokenizer_dir: str):
    """The sequence layout ids of the run's text tokenizer (what the loader builds sequences with)."""
    from transformers import AutoTokenizer

    from train.sequence import LayoutIds

    if not tokenizer_dir:
        raise ManifestError("the plan needs the text tokenizer the shards were made with (prompt lengths); pass --tokenizer DIR")
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as e:
        raise ManifestError(f"tokenizer {tokenizer_dir}: cannot load it ({e}); pass the folder of the run's tokenizer") from None
    return LayoutIds.from_tokenizer(tok)


def online_weights(manifest: MixtureManifest, sizes: dict[str, SourceSize]):
    """The loader's view of online reweighting (`train.reweight.OnlineWeights`), or None when no task reweights."""
    from train.reweight import OnlineWeights

    specs = {t: s.reweight for t, s in manifest.tasks.items() if s.reweight is not None}
    if not specs:
        return None
    initial = {t: resolve_weights(manifest, t, 0, {n: sizes[n] for n in manifest.tasks[t].sources}) for t in specs}
    return OnlineWeights(initial, specs)
