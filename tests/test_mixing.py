"""Long-run mixture exactness over real token shards: every source's cumulative draw stays within one sample
(or one sample's tokens) of its weight times the cumulative total at every step, through a schedule change,
a resume and a change of world size; and `synergen mix` plans what the loader then does."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.test_data import model_spec, tokenizer, write_source  # noqa: F401 - tokenizer is a fixture
from train.data import LoaderConfig, StreamingLoader, StreamingMixture
from tests.mixing_reference import reference_merge
from train.mixture import MixtureManifest, merge_by_credit, plan_mixture

UND = ("u_a", "u_b", "u_c", "u_d")
GEN = ("g_a", "g_b", "g_c", "g_d")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer):  # noqa: F811
    root = str(tmp_path_factory.mktemp("mixing"))
    for i, n in enumerate(UND):
        write_source(root, n, "und", [23, 17], tokenizer, seed=10 + i, tiles=True)
    for i, (n, groups) in enumerate(zip(GEN, (4, 12, 8, 20))):  # image lengths differ 5x between sources
        write_source(root, n, "gen", [19, 21], tokenizer, seed=20 + i, groups=groups)
    return root


def mixture(root: str, batch: int, und_unit: str, gen_unit: str, reweight: dict | None = None) -> MixtureManifest:
    und_w, gen_w = (0.01, 0.09, 0.4, 0.5), (0.07, 0.03, 0.4, 0.5)
    raw = {
        "name": "mixing", "data_root": root, "seq_len": 96, "max_tiles": 4, "thumbnail": True,
        "tasks": {
            "und": {"global_batch": batch, "unit": und_unit,
                    "sources": {n: {"catalogs": [n], "weight": w} for n, w in zip(UND, und_w)}},
            "gen": {"global_batch": batch, "unit": gen_unit,
                    "sources": {n: {"catalogs": [n], "weight": w} for n, w in zip(GEN, gen_w)}},
        },
        # the small weights move to other sources at step 80
        "schedule": [{"at_step": 80, "weights": {"und": dict(zip(UND, (0.5, 0.01, 0.09, 0.4))),
                                                 "gen": dict(zip(GEN, (0.5, 0.4, 0.03, 0.07)))}}],
    }
    return MixtureManifest.model_validate(raw)


def dataset(mf: MixtureManifest, tokenizer, tmp_path, **cfg) -> StreamingMixture:  # noqa: F811
    return StreamingMixture(mf, model_spec(tokenizer), tokenizer, LoaderConfig(seed=7, cache_dir=str(tmp_path / "cache"), **cfg))


def weights_at(mf: MixtureManifest, task: str, step: int) -> dict[str, float]:
    w = mf.explicit_weights(task, step)
    total = sum(w.values())
    return {n: v / total for n, v in w.items()}


@pytest.mark.parametrize("batch, und_unit, gen_unit", [(4, "samples", "tokens"), (12, "tokens", "samples"),
                                                        (64, "samples", "tokens"), (64, "tokens", "samples")])
def test_cumulative_shares_stay_within_one_sample_every_step(shards, tokenizer, tmp_path, batch, und_unit, gen_unit):  # noqa: F811
    mf = mixture(shards, batch, und_unit, gen_unit)
    ds = dataset(mf, tokenizer, tmp_path)
    units = {"und": und_unit, "gen": gen_unit}
    planner = ds._planner()
    owed = {t: {n: 0.0 for n in mf.tasks[t].sources} for t in units}  # sum of w(step) * T(step)
    drawn = {t: {n: 0 for n in mf.tasks[t].sources} for t in units}
    longest = {t: 1 for t in units}
    worst = {t: 0.0 for t in units}
    for step in range(200):
        if step == 130:  # resume from a JSON checkpoint of the loader state, in a fresh planner
            state = json.loads(json.dumps(planner.state(step)))
            planner = ds._planner()
            planner.load(state)
        plan = planner.plan_step(step)
        for task, p in plan.items():
            cost = p["length"] if units[task] == "tokens" else np.ones(len(p["length"]), np.int64)
            assert len(cost) == batch
            longest[task] = max(longest[task], int(cost.max()))
            for n, w in weights_at(mf, task, step).items():
                owed[task][n] += w * int(cost.sum())
            for si, name in enumerate(p["names"]):
                drawn[task][name] += int(cost[p["source"] == si].sum())
            for n in owed[task]:
                gap = abs(drawn[task][n] - owed[task][n])
                worst[task] = max(worst[task], gap / longest[task])
                assert gap <= longest[task] + 1e-6, (task, n, step, drawn[task][n], owed[task][n], longest[task])
    # every source was drawn, even at weight 0.01 in a batch of 4 (the per-batch sampler never drew it)
    assert all(v > 0 for t in drawn for v in drawn[t].values())
    assert max(worst.values()) > 0.2  # the bound is met with little room: the check is not vacuous


def test_two_then_three_ranks_continue_the_one_rank_stream_and_its_credit(shards, tokenizer, tmp_path):  # noqa: F811
    mf = mixture(shards, 6, "samples", "tokens")

    def run(start_state, steps, world):
        outs = []
        for rank in range(world):
            loader = StreamingLoader(dataset(mf, tokenizer, tmp_path, rank=rank, world_size=world, max_steps=steps))
            if start_state is not None:
                loader.load_state_dict(start_state)
            outs.append((list(loader), loader.state_dict()))
        assert all(o[1] == outs[0][1] for o in outs)  # the state is global: equal on every rank
        return outs

    one = run(None, 90, 1)[0][0]
    two = run(None, 85, 2)  # the schedule changes at step 80, between the two runs' ends
    three = run(json.loads(json.dumps(two[0][1])), 90, 3)
    for step in range(90):
        parts = [o[0][step if step < 85 else step - 85] for o in (two if step < 85 else three)]
        for task in ("und", "gen"):
            mine = sorted(k for sb in parts for k in sb.samples[task])
            assert mine == sorted(one[step].samples[task])  # the ranks partition the one-rank batch
            assert parts[0].report["tasks"][task]["global"] == one[step].report["tasks"][task]["global"]
        assert parts[0].report["cumulative"] == one[step].report["cumulative"]
    cum = one[-1].report["cumulative"]["und"]
    total = sum(e["samples"] for e in cum.values())
    assert total == 90 * 6 and abs(cum["u_a"]["samples"] - (80 * 6 * 0.01 + 10 * 6 * 0.5)) <= 1


def test_merge_keeps_random_costs_within_one_sample_through_weight_changes():
    rng = np.random.default_rng(0)
    names = ["a", "b", "c", "d", "e"]
    credit = [0.0] * 5
    drawn, owed = np.zeros(5), np.zeros(5)
    worst = 0.0
    for step in range(300):
        if step % 50 == 0:  # new weights from 0.01 to 0.5, one source at times left out (weight 0)
            w = rng.choice([0.01, 0.02, 0.05, 0.1, 0.3, 0.5], 5)
            if step == 100:
                w[2] = 0
            w = w / w.sum()
        active = [i for i in range(5) if w[i] > 0]
        costs = [rng.integers(1, 300, 64).tolist() for _ in active]
        picks, rows = merge_by_credit(costs, [w[i] for i in active], [credit[i] for i in active], 16)
        flat = [c for cs in costs for c in cs]
        got = np.zeros(5)
        for p, r in zip(picks.tolist(), rows.tolist()):
            got[active[p]] += flat[r]
        total = got.sum()
        for i in active:
            credit[i] += w[i] * total - got[i]
        drawn += got
        owed += w * total
        worst = max(worst, float(np.abs(drawn - owed).max()))
        assert np.all(np.abs(drawn - owed) <= 300), (step, drawn - owed)
    assert worst > 100


def test_merge_picks_exactly_what_the_pick_by_pick_reference_picks():
    """Unit and token costs, carried credits of both signs, unbalanced credits (a source left the mixture: the
    fallback when none is owed), sources that run out of candidates or have none, batches larger than all candidates."""
    rng = np.random.default_rng(1)
    for trial in range(300):
        k = int(rng.integers(1, 9))
        w = rng.random(k) + 0.005
        w = list(w / w.sum())
        unit = trial % 2 == 0
        costs = [np.ones(int(rng.integers(0, 40)), np.int64) if unit else rng.integers(1, 4000, int(rng.integers(0, 40)))
                 for _ in range(k)]
        scale = 1.0 if unit else 2000.0
        credits = list(rng.normal(0, scale, k) + (3 * scale if trial % 7 == 0 else 0))
        batch = int(rng.integers(1, 80))
        want = reference_merge([c.tolist() for c in costs], w, credits, batch)
        got = merge_by_credit(costs, w, credits, batch)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), trial


@pytest.mark.parametrize("und_unit, gen_unit", [("samples", "tokens"), ("tokens", "samples")])
def test_plan_matches_the_loader_within_one_percent(shards, tokenizer, tmp_path, und_unit, gen_unit):  # noqa: F811
    """`plan_mixture` with the loader's lengths and <UNCOND> rate against what the loader's planner draws."""
    from train.sequence import LayoutIds

    mf = mixture(shards, 12, und_unit, gen_unit).model_copy(update={"uncond_prob": 0.3, "seq_len": 36})
    steps = 300
    plans, _ = plan_mixture(mf, steps, LayoutIds.from_tokenizer(tokenizer))
    planner = dataset(mf, tokenizer, tmp_path)._planner()
    for step in range(steps):
        planner.plan_step(step)
    state = planner.state(steps)
    dropped = 0
    for p in plans:
        got = state["mix"][p.task][p.source]
        cur = state["sources"][p.source]
        dropped += cur["dropped"]
        epochs = cur["epoch"] + cur["pos"] / cur["size"]
        assert got["samples"] == pytest.approx(p.samples, rel=0.01), p
        assert got["tokens"] == pytest.approx(p.tokens, rel=0.01), p
        # the plan's `usable` is an expectation over the <UNCOND> draw; a 40-sample source drawn ~500 times realises it
        # with binomial noise, so epochs may differ from the plan by that noise (3 sigma) on top of the 1%
        q = 1 - p.usable
        noise = 3 * math.sqrt(q * (1 - q) / max(1.0, epochs * cur["size"])) / max(p.usable, 1e-9)
        assert epochs == pytest.approx(p.epochs, rel=0.01 + noise), p
    assert dropped > 0  # samples too long for seq_len are passed over, and the plan's epochs count them
