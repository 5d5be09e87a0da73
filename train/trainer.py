"""The trainer: one config -> model, streaming data, DeepSpeed engine -> a readable step loop.

Each optimizer step takes, per accumulation micro-step, one understanding and one generation batch from
the loader (equal per-task batches, as in the paper) and runs each as its own micro-batch, so DeepSpeed
accumulates `grad_accum x 2` micro-batches per step, clips, and steps AdamW over the trainable parameters
only (the model's progressive stage decides which). The same code runs single-process and under the
`deepspeed` launcher, on CPU (fp32) and GPU (bf16).

    train(TrainConfig.load("infra/train/demo.yaml"), resume=True)
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import queue
import random
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from model.batch import PackedBatch
from synergen import storage
from train import checkpoint
from train.config import TrainConfig, save_config
from train.metrics import MetricsWriter, StepMeter, step_record
from train.reweight import ReweightHook

log = logging.getLogger(__name__)

TASKS = ("und", "gen")


class StepData(Protocol):
    """What the trainer needs from the loader: per-task batches per step, a mixture report, resumable state."""

    def __next__(self) -> tuple[dict[str, PackedBatch], dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclass
class TrainResult:
    """What a run did: its last step, per-step records (this process's view), and where things are."""

    output_dir: str  # local path or URL, as configured
    first_step: int
    last_step: int
    records: list[dict[str, Any]] = field(default_factory=list)
    export_dir: str | None = None

    @property
    def metrics_url(self) -> str:
        return storage.join(self.output_dir, "metrics.jsonl")


# ---- set-up ---------------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int]:
    """Join the process group the launcher describes, or make a one-process group; returns (rank, world)."""
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed()
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def use_bf16(cfg: TrainConfig) -> bool:
    """bf16 where the hardware has it (CUDA with bf16 support), fp32 on CPU, unless the config insists."""
    if cfg.precision == "fp32":
        return False
    has = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if cfg.precision == "bf16" and not has:
        log.warning("precision bf16 asked for but this machine has no bf16 accelerator: training in fp32")
    return has


def build_model(cfg: TrainConfig, tokenizer=None):
    """The SynerGen-VL model from a preset name (plus the tokenizer's ids) or a saved model folder (local or URL),
    with the run's template and loss reduction when the config sets them."""
    from model.config import PRESETS, config_ids_from_tokenizer, preset_config
    from model.modeling import SynerGenVLForCausalLM

    if cfg.model in PRESETS:
        overrides = dict(cfg.model_overrides)
        if tokenizer is None and cfg.tokenizer:
            tokenizer = load_tokenizer(cfg)
        if tokenizer is not None:
            overrides = {**config_ids_from_tokenizer(tokenizer), **overrides}
        model = SynerGenVLForCausalLM(preset_config(cfg.model, **overrides))
    else:
        model = SynerGenVLForCausalLM.from_pretrained(cfg.model)
    for key in ("sequence_template", "loss_reduction"):
        if getattr(cfg, key) is not None:
            setattr(model.config, key, getattr(cfg, key))
    log.info("sequence template %s, loss reduction %s", model.config.sequence_template, model.config.loss_reduction)
    return model


class LoaderSteps:
    """`train.data.StreamingLoader` as a StepData: (batches per task, realised-mixture report) per step."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.tasks = tuple(t for t in TASKS if t in loader.dataset.manifest.tasks)
        self._it: Iterator | None = None

    def __next__(self) -> tuple[dict[str, PackedBatch], dict[str, Any]]:
        if self._it is None:
            self._it = iter(self.loader)
        sb = next(self._it)
        return sb.batches, sb.report

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: Any) -> None:
        if self._it is not None:
            raise RuntimeError("load_state_dict after iteration started")
        self.loader.load_state_dict(state)


def load_tokenizer(cfg: TrainConfig):
    """The run's text tokenizer (a local folder or a URL); a model folder from `synergen init` holds one."""
    from pipeline.text_tokenizer import load_text_tokenizer
    from train.config import TrainConfigError

    if not cfg.tokenizer:
        raise TrainConfigError("tokenizer: the loader needs the text tokenizer the shards were made with; set `tokenizer: DIR` "
                               "(the folder `synergen init` wrote holds it)")
    return load_text_tokenizer(cfg.tokenizer)


def build_data(cfg: TrainConfig, model, rank: int, world_size: int, tokenizer=None) -> LoaderSteps:
    """The streaming mixture over the manifest's catalogs, as this rank's per-task batches each step.

    The model and the tokenizer must agree on every special-token id and on BOS (`check_model_tokenizer`); the
    catalogs must name the tokenizer's vocabulary (the loader checks its hash). The model config records the
    stage's tiling, so generation preprocesses images as the data was."""
    from model.template import check_model_tokenizer
    from pipeline.catalog import vocab_hash
    from train.data import LoaderConfig, ModelDataSpec, StreamingLoader, StreamingMixture
    from train.mixture import MixtureManifest

    if tokenizer is None:
        tokenizer = load_tokenizer(cfg)
    ids = check_model_tokenizer(model.config, tokenizer, cfg.model, cfg.tokenizer)
    manifest = MixtureManifest.load(cfg.mixture, data_root=cfg.data_root)
    model.config.max_tiles, model.config.thumbnail = int(manifest.max_tiles), bool(manifest.thumbnail)
    spec = ModelDataSpec(model.config.fold_geometry, model.config.codebook_size, vocab_hash(tokenizer))
    loader_cfg = LoaderConfig(rank=rank, world_size=world_size, seed=cfg.seed, **cfg.data_options.model_dump())
    dataset = StreamingMixture(manifest, spec, tokenizer, loader_cfg, layout_ids=ids)
    return LoaderSteps(StreamingLoader(dataset, num_workers=cfg.num_workers))


@dataclass
class RunFolders:
    """Where a run writes: `output_dir` (local or remote) and, for a remote one, the local folder that stages
    checkpoints and metrics before they are uploaded (`TrainConfig.local_dir`, default a temp folder named
    after the output, the same on every rank of a node)."""

    output: str
    local: str

    @classmethod
    def of(cls, cfg: TrainConfig) -> "RunFolders":
        out = str(cfg.output_dir)
        if storage.is_local(out):
            return cls(out, storage.local_path(out))
        local = cfg.local_dir or os.path.join(tempfile.gettempdir(), f"synergen-run-{hashlib.sha256(out.encode()).hexdigest()[:12]}")
        return cls(out, local)

    @property
    def remote(self) -> bool:
        return not storage.is_local(self.output)

    @property
    def checkpoints(self) -> str:
        return storage.join(self.output, "checkpoints")

    def start(self, resume: bool) -> None:
        """Rank 0: create the local folder; when resuming a remote run, fetch its metrics to append to."""
        os.makedirs(self.local, exist_ok=True)
        remote_metrics = storage.join(self.output, "metrics.jsonl")
        if self.remote and resume and storage.exists(remote_metrics):
            storage.write_bytes(os.path.join(self.local, "metrics.jsonl"), storage.read_bytes(remote_metrics))

    def sync(self) -> None:
        """Rank 0: upload the metrics and TensorBoard events (a remote run; a local one writes them in place)."""
        if not self.remote:
            return
        path = os.path.join(self.local, "metrics.jsonl")
        if os.path.exists(path):
            storage.write_bytes(storage.join(self.output, "metrics.jsonl"), Path(path).read_bytes())
        if os.path.isdir(os.path.join(self.local, "tb")):
            storage.publish_dir(os.path.join(self.local, "tb"), storage.join(self.output, "tb"))

    @property
    def checkpoint_staging(self) -> str:
        return os.path.join(self.local, "checkpoints")


def build_optimizer(cfg: TrainConfig, model) -> torch.optim.Optimizer:
    """AdamW (Table 8) over the trainable parameters only; no weight decay on biases, norms and 1-d tensors."""
    params = [p for p in model.trainable_parameters() if p.requires_grad]
    if not params:
        raise checkpoint.CheckpointError(f"stage {cfg.stage} leaves no trainable parameter in the model")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of `cfg.lr` after `s` optimizer steps: linear warm-up, then constant (stage 1) or cosine."""
    warm, total = cfg.warmup_steps, cfg.steps

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / (warm + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warm) / max(1, total - warm))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_engine(cfg: TrainConfig, model, tasks: tuple[str, ...]):
    """`deepspeed.initialize` with our AdamW and schedule, batch geometry and precision from the config."""
    import deepspeed

    ds_config = cfg.deepspeed_config(len(tasks), bf16=use_bf16(cfg))
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Prefetcher:
    """Fetches the next steps' batches in a thread while the model computes.

    Each item carries the loader state taken right after it was produced, so a checkpoint records the
    state of the last batch *consumed*, never of batches merely prefetched: resume stays exact.
    """

    def __init__(self, data: StepData, depth: int = 2) -> None:
        self._data = data
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batches, report = next(self._data)
                self._put((batches, report, copy.deepcopy(self._data.state_dict())))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(e)

    def _put(self, item) -> None:
        """Queue `item` unless the consumer closed: a consumer that stopped reading leaves the queue full, and an
        error raised by the loader after the run (a planner waiting for a reweight update that will not come) must
        not block the thread on it."""
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[tuple[dict[str, PackedBatch], dict[str, Any], dict[str, Any]]]:
        return self

    def __next__(self):
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _own_grad_norm(model) -> float:
    """Global L2 norm of the (already all-reduced) gradients, for engines that do not report one (ZeRO-0 fp32)."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


# ---- the loop -------------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: bool = False, *, model=None, data: StepData | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Run `cfg` to `cfg.steps` (from the latest good checkpoint when `resume`); return what was done.

    `model` and `data` default to what the config names; passing them lets a caller (the benchmark, a test)
    swap in its own while keeping everything else.
    """
    cfg = cfg.resolved()
    rank, world = init_distributed()
    run = RunFolders.of(cfg)
    if rank == 0:
        run.start(resume)
        save_config(cfg, storage.join(run.output, "train_config.yaml"))

    seed_everything(cfg.seed)  # identical initial weights on every rank
    tokenizer = load_tokenizer(cfg) if cfg.tokenizer else None
    if model is None:
        model = build_model(cfg, tokenizer)
    model.set_stage(cfg.stage)
    from model.modeling import packed_attention_for

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.config._attn_implementation = cfg.attention if cfg.attention != "auto" else packed_attention_for(device)
    log.info("packed attention: %s", model.config._attn_implementation)
    n_train = sum(p.numel() for p in model.trainable_parameters())
    n_all = sum(p.numel() for p in model.parameters())
    log.info("stage %s: %d of %d parameters trainable (%.1f%%)", cfg.stage, n_train, n_all, 100 * n_train / n_all)
    if data is None:
        data = build_data(cfg, model, rank, world, tokenizer)
    tasks = tuple(getattr(data, "tasks", TASKS))
    engine = build_engine(cfg, model, tasks)
    reweight = ReweightHook.attach(data, cfg.grad_accum)  # None unless the mixture reweights online

    start = 0
    seed_everything(cfg.seed * 1000 + rank + 1)  # per-rank streams (dropout, sampling) differ
    if resume:
        state = checkpoint.load_latest(engine, run.checkpoints, run.checkpoint_staging)
        if state is not None:
            start = int(state["step"])
            loader_state = checkpoint.restore_client_state(state, rank, world)
            data.load_state_dict(loader_state)
            if reweight is not None:
                reweight.load(state.get("reweight"), start)
        else:
            log.info("--resume: no checkpoint in %s yet, starting at step 0", run.checkpoints)
    writer = MetricsWriter(Path(run.local), enabled=rank == 0, resume_step=start)
    result = TrainResult(output_dir=run.output, first_step=start + 1, last_step=start)
    stream = Prefetcher(data)
    loader_state: dict[str, Any] = {}
    try:
        for step in range(start + 1, cfg.steps + 1):
            engine.train()
            meter = StepMeter()
            t0 = time.perf_counter()
            lr = engine.get_lr()[0]
            own_norm = None
            mixture: dict[str, Any] = {}
            for micro in range(cfg.grad_accum):
                tw = time.perf_counter()
                batches, mixture, loader_state = next(stream)
                meter.data_wait += time.perf_counter() - tw
                for i, task in enumerate(tasks):
                    batch = batches[task].to(engine.device)
                    output = engine(batch)
                    engine.backward(output.loss)
                    meter.add(batch, output)
                    if micro == cfg.grad_accum - 1 and i == len(tasks) - 1 and engine.zero_optimization_stage() == 0:
                        own_norm = _own_grad_norm(engine.module)
                    engine.step()
            norm = engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else own_norm
            step_time = time.perf_counter() - t0
            reduced = meter.reduce()
            if reweight is not None:
                reweight.after_step(step, reduced["source_loss"])
            record = step_record(step, reduced, step_time, lr, grad_norm, mixture, reweight)
            result.records.append(record)
            result.last_step = step
            if step % cfg.log_every == 0 or step == cfg.steps:
                writer.write(record)
            if on_step is not None:
                on_step(record)
            if step % cfg.save_every == 0 or step == cfg.steps:
                extra = {"stage": cfg.stage, **({"reweight": reweight.state()} if reweight is not None else {})}
                checkpoint.save(engine, run.checkpoints, step, loader_state, extra, keep_last=cfg.keep_last,
                                local_dir=run.checkpoint_staging)
                if rank == 0:
                    run.sync()
    finally:
        if reweight is not None:
            reweight.close()  # before the prefetcher: its planner may be waiting for an update that will not come
        stream.close()
        writer.close()
    if rank == 0:
        run.sync()
    if cfg.export and result.last_step == cfg.steps:
        result.export_dir = checkpoint.export_model(engine, storage.join(run.output, "model"), tokenizer)
        log.info("exported the model in transformers format to %s", result.export_dir)
    return result
