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


def test_workers_plan_each_step_about_once_and_yield_the_in_process_stream(corpus, tokenizer):
    """3 workers, the trainer slower than the loader (as in training): each worker plans the steps it builds and
    the steps its predecessor did not hand over in time (its first step, or on a machine so loaded that the
    predecessor waited for a CPU longer than a step takes), so about one planned step per step, where a bare
    DataLoader's workers plan every step each (3 per step); the batches are the in-process ones."""
    steps = 18
    single, _ = stream(corpus, tokenizer, steps)
    ds = StreamingMixture(manifest(corpus), model_spec(tokenizer), tokenizer, LoaderConfig(seed=7, max_steps=steps))
    out = []
    for sb in StreamingLoader(ds, num_workers=3, prefetch_factor=1):
        out.append(sb)
        time.sleep(0.03)  # the trainer's step
    assert [as_bytes(x) for x in out] == [as_bytes(x) for x in single]
    planned = {sb.report["io"]["worker"]: sb.report["io"]["planned"] for sb in out}  # each worker's count at its last step
    assert sorted(planned) == [0, 1, 2]
    assert sum(planned.values()) <= 2 * steps, planned  # handed over: steps + 3 (the first steps); a bare DataLoader: 3 * steps


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
