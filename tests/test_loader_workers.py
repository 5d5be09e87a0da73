"""DataLoader workers share the planning (`train.dataset.PlanRelay`): the worker of a step hands the planner's
progress to the worker of the next, so each step is planned once per rank; a worker left without a hand-over
plans alone, and the stream is the in-process one whatever happens."""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from loader_corpus import corpus, tokenizer  # noqa: F401 - module-scoped fixtures shared by the loader tests
from loader_corpus import as_bytes, manifest, model_spec, stream
from train.data import LoaderConfig, StreamingLoader, StreamingMixture
from train.dataset import PlanRelay


def test_each_worker_plans_only_its_own_steps_and_yields_the_in_process_stream(corpus, tokenizer):
    """3 workers, the trainer slower than the loader (as in training): after its first chunk of steps (which may
    come before the worker before it has planned the steps before it: it plans those itself) every worker plans
    only the steps it builds (a bare DataLoader's workers plan every step), and the batches are the in-process ones."""
    k = StreamingLoader.STEPS_PER_ITEM
    steps = 3 * 2 * k  # two chunks per worker
    single, _ = stream(corpus, tokenizer, steps)
    ds = StreamingMixture(manifest(corpus), model_spec(tokenizer), tokenizer, LoaderConfig(seed=7, max_steps=steps))
    out = []
    for sb in StreamingLoader(ds, num_workers=3, prefetch_factor=1):
        out.append(sb)
        time.sleep(0.03)  # the trainer's step
    assert [as_bytes(x) for x in out] == [as_bytes(x) for x in single]
    ios = {w: [sb.report["io"] for sb in out if sb.report["io"]["worker"] == w] for w in range(3)}
    assert all(len(io) == 2 * k for io in ios.values())  # chunks of k consecutive steps, dealt round robin
    for io in ios.values():
        assert io[-1]["planned"] - io[0]["planned"] == len(io) - k  # its own steps since its first chunk (planned at once)
    assert sum(io[-1]["planned"] for io in ios.values()) < 2 * steps  # without the relay: 3 * steps


def test_a_worker_plans_alone_what_nobody_hands_over_and_uses_what_is_handed_over(corpus, tokenizer, monkeypatch):
    """Worker 1 of 2, run here: the progress before its first step is handed over (it plans 1 step), its
    predecessor then stops without handing the next over (end of file: it plans the missing step and its own),
    and its batches are the in-process ones either way."""
    steps = 4
    single, _ = stream(corpus, tokenizer, steps)
    ds = StreamingMixture(manifest(corpus), model_spec(tokenizer), tokenizer, LoaderConfig(seed=7, max_steps=steps))
    ahead = ds._planner()
    ahead.plan_step(0)
    relay = PlanRelay(2)
    relay.send(0, 1, ahead.progress())  # worker 0's hand-over before step 1 (worker 0 writes pipe 1)
    ds._relay = relay
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=1, num_workers=2))
    try:
        it = iter(ds)
        first = next(it)
        assert first.step == 1 and first.report["io"]["planned"] == 1
        second = next(it)  # keep() closed worker 0's end here: nothing more comes, the pipe reads end of file
        assert second.step == 3 and second.report["io"]["planned"] == 3
        assert [as_bytes(first), as_bytes(second)] == [as_bytes(single[1]), as_bytes(single[3])]
        assert list(it) == []
    finally:
        relay.close()
