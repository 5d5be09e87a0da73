"""Online reweighting: the policies' limits and purity, the loader applying updates at the documented step without
repeating or skipping samples, and real training runs: two ranks under the DeepSpeed launcher computing the same
weights, and a SIGKILLed run resuming to the same batches and weight trajectory as an uninterrupted one."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from synergen.errors import ConfigMismatchError
from tests.conftest import free_port
from tests.test_data import model_spec, tokenizer  # noqa: F401 - tokenizer is a fixture
from tests.test_data import write_source as write_data_source
from tests.test_train import clean_env
from tests.train_corpus import make_tokenizer, write_source, write_train_config
from train.checkpoint import MARKER, list_tags
from train.data import LoaderConfig, StreamingLoader, StreamingMixture
from train.metrics import StepMeter, read_metrics
from train.mixture import MixtureManifest
from synergen.demo.report import plot_weights
from train.reweight import ReweightHook, ReweightSpec, initial_state, project, update
from train.trainer import LoaderSteps, Prefetcher

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


# ---- the policies, as pure functions -------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["exp3", "doremi"])
def test_a_policy_that_would_drive_a_weight_below_the_floor_does_not(policy):
    spec = ReweightSpec(policy=policy, reference="ref.jsonl" if policy == "doremi" else None, floor=0.05, max_change=0.5, eta=50)
    state = initial_state({"easy": 0.3, "hard": 0.4, "mid": 0.3})
    ref = {"easy": 1.0, "hard": 1.0, "mid": 1.0}
    for _ in range(200):  # "hard" keeps a far higher loss: the target gives "easy" less than the floor
        new = update(spec, state, {"easy": 0.01, "hard": 9.0, "mid": 1.0}, ref)
        w = new["weights"]
        assert sum(w.values()) == pytest.approx(1, abs=1e-9)
        assert min(w.values()) >= spec.floor - 1e-12
        assert all(abs(w[n] - state["weights"][n]) <= spec.max_change + 1e-12 for n in w)
        state = json.loads(json.dumps(new))  # the state survives a JSON checkpoint
    assert w["easy"] == pytest.approx(spec.floor) and w["hard"] > 0.5
    # a pure function: the same state and losses give the same floats
    assert update(spec, state, {"easy": 0.5, "hard": 2.0}, ref) == update(spec, state, {"easy": 0.5, "hard": 2.0}, ref)


def test_the_cap_limits_each_update_and_the_floor_wins_over_it():
    w = project({"a": 0.9, "b": 0.1, "c": 0.0}, {"a": 0.4, "b": 0.3, "c": 0.3}, floor=0.02, max_change=0.1)
    assert w["a"] == pytest.approx(0.5) and w["c"] == pytest.approx(0.2) and sum(w.values()) == pytest.approx(1)
    w = project({"a": 0.99, "b": 0.01}, {"a": 0.995, "b": 0.005}, floor=0.1, max_change=0.01)  # starts below the floor
    assert w["b"] >= 0.1 - 1e-12 and sum(w.values()) == pytest.approx(1)


def test_the_policy_reads_the_same_losses_however_the_documents_are_split_over_ranks():
    """Per-document losses (float32 sums from 1e-5, one confidently predicted target, to 1e5, a tiled image's
    ~16k codes early in training) of one global batch, split over 1, 2 and 3 ranks in different orders: the reduced per-source losses, and so the policy's
    weights, are the same floats; summing per rank and then over ranks (the reduction before) is not."""
    rng = np.random.default_rng(0)
    names = ("a", "b", "c")
    docs = [(names[i % 3], float(np.float32(10 ** rng.uniform(-5, 5))), int(rng.integers(1, 4096))) for i in range(3000)]
    reduced, naive = [], []
    for world in (1, 2, 3, 2):
        order = rng.permutation(len(docs))
        meters = [StepMeter() for _ in range(world)]
        for r, m in enumerate(meters):
            m.add_documents([docs[j] for j in order[r::world]])
        reduced.append(StepMeter.merge([m.mine() for m in meters])["source_loss"])
        naive.append({n: sum(sum(m.source_docs[n]) for m in meters) for n in names})
    assert all(r == reduced[0] for r in reduced)
    assert reduced[0]["a"][1] == sum(n for s, _, n in docs if s == "a")
    assert any(nv != naive[0] for nv in naive)  # float addition is not associative at these magnitudes
    spec = ReweightSpec(policy="exp3", eta=5)
    state = initial_state({n: 1 / 3 for n in names})
    weights = [update(spec, state, {n: s / c for n, (s, c) in r.items()})["weights"] for r in reduced]
    assert all(w == weights[0] for w in weights)


# ---- the loader side: updates apply at the documented step; cursors never move because of them -----------


def _online_mixture(tmp_path, tokenizer, names, global_batch: int, reweight: dict) -> MixtureManifest:
    """One `und` task over equal-weight sources of 17 samples each (shards of 9 and 8), reweighted online."""
    root = str(tmp_path / "data")
    for i, n in enumerate(names):
        write_data_source(root, n, "und", [9, 8], tokenizer, seed=i)
    return MixtureManifest.model_validate({"name": "online", "data_root": root, "seq_len": 64, "tasks": {"und": {
        "global_batch": global_batch, "sources": {n: {"catalogs": [n], "weight": 1} for n in names},
        "reweight": reweight}}})


def test_updates_apply_at_step_plus_one_plus_lag_without_repeats_or_skips(tmp_path, tokenizer):  # noqa: F811
    names = ("u_a", "u_b", "u_c")
    mf = _online_mixture(tmp_path, tokenizer, names, 6, {"policy": "exp3", "every": 3, "warmup": 2, "lag": 1})
    ds = StreamingMixture(mf, model_spec(tokenizer), tokenizer, LoaderConfig(seed=3, max_steps=16, cache_dir=str(tmp_path / "c")))
    updates = {5: {"u_a": 0.8, "u_b": 0.1, "u_c": 0.1}, 8: {"u_a": 0.1, "u_b": 0.1, "u_c": 0.8},
               11: {"u_a": 0.2, "u_b": 0.7, "u_c": 0.1}, 14: {"u_a": 0.4, "u_b": 0.3, "u_c": 0.3}}
    for s, w in updates.items():  # what the trainer publishes after steps 5, 8, 11, 14 (warmup 2, every 3)
        ds.online.publish("und", s, w)
    out = list(StreamingLoader(ds))
    ds.online.close()
    for sb in out:  # loader step k is trainer step k + 1; an update after step s applies from trainer step s + 1 + lag
        due = [s for s in updates if s + 1 + 1 <= sb.step + 1]
        assert sb.report["tasks"]["und"]["weights"] == (updates[max(due)] if due else pytest.approx({n: 1 / 3 for n in names}))
    seen = Counter((s, e, k) for sb in out for s, e, k in sb.samples["und"])
    assert max(seen.values()) == 1  # no sample twice within its source's epoch
    for n in names:  # none skipped: each source's position advances by exactly what it drew
        drawn = [sb.report["cumulative"]["und"][n]["samples"] for sb in out]
        cur = [sb.report["sources"][n]["epoch"] * 17 + sb.report["sources"][n]["pos"] for sb in out]
        assert drawn == cur
    assert out[-1].report["cumulative"]["und"]["u_c"]["samples"] - out[8].report["cumulative"]["und"]["u_c"]["samples"] > 15

    # resuming at step 9 from a checkpoint without policy state: the hook publishes the starting weights for the
    # updates the loader would otherwise wait for (after step 8), instead of leaving it blocked
    ds2 = StreamingMixture(mf, model_spec(tokenizer), tokenizer, LoaderConfig(seed=3, max_steps=12, cache_dir=str(tmp_path / "c")))
    ReweightHook(ds2.online).load(None, 9)
    loader = StreamingLoader(ds2)
    loader.load_state_dict(out[8].state)
    resumed = list(loader)
    ds2.online.close()
    assert [sb.step for sb in resumed] == [9, 10, 11]
    assert all(sb.report["tasks"]["und"]["weights"] == pytest.approx({n: 1 / 3 for n in names}) for sb in resumed)


def test_with_grad_accum_an_update_applies_from_the_first_micro_step_of_step_s_plus_one_plus_lag(tmp_path, tokenizer):  # noqa: F811
    names = ("u_a", "u_b")
    mf = _online_mixture(tmp_path, tokenizer, names, 4, {"policy": "exp3", "every": 2, "warmup": 1, "lag": 1})
    ds = StreamingMixture(mf, model_spec(tokenizer), tokenizer, LoaderConfig(seed=3, max_steps=24, cache_dir=str(tmp_path / "c")))
    loader = StreamingLoader(ds)
    hook = ReweightHook.attach(LoaderSteps(loader), grad_accum=3)  # 3 loader steps per trainer step
    updates = {3: {"u_a": 0.9, "u_b": 0.1}, 5: {"u_a": 0.2, "u_b": 0.8}, 7: {"u_a": 0.6, "u_b": 0.4}}
    for s, w in updates.items():  # what the trainer publishes after trainer steps 3, 5, 7 (warmup 1, every 2)
        ds.online.publish("und", s, w)
    out = list(loader)
    hook.close()
    for sb in out:  # loader step k is micro-step k % 3 of trainer step k // 3 + 1
        due = [s for s in updates if s + 1 + 1 <= sb.step // 3 + 1]
        assert sb.report["tasks"]["und"]["weights"] == (updates[max(due)] if due else {"u_a": 0.5, "u_b": 0.5}), sb.step
    # the update after trainer step 3 is first sampled at loader step (3 + lag) x 3 = 12
    assert [sb.report["tasks"]["und"]["weights"]["u_a"] for sb in out[11:13]] == [0.5, 0.9]
    assert mf.tasks["und"].reweight.update_steps(3).applies_at(3) == 12
    # resuming with another grad_accum would move every update to other loader steps: refused, naming the fix
    saved = hook.state()
    hook.online.grad_accum = 2
    with pytest.raises(ConfigMismatchError, match="grad_accum 3 but the config has 2.*resume with grad_accum: 3"):
        hook.load(saved, 6)


def test_the_prefetch_thread_ends_when_the_run_ends_before_an_update_it_waits_for(tmp_path, tokenizer):  # noqa: F811
    # lag 1 < the prefetch depth of 2
    mf = _online_mixture(tmp_path, tokenizer, ("u_a", "u_b"), 4, {"policy": "exp3", "every": 3, "lag": 1})
    ds = StreamingMixture(mf, model_spec(tokenizer), tokenizer, LoaderConfig(seed=3, cache_dir=str(tmp_path / "c")))
    steps = LoaderSteps(StreamingLoader(ds))
    hook = ReweightHook.attach(steps, grad_accum=1)
    stream = Prefetcher(steps, depth=2)
    hook.online.publish("und", 3, {"u_a": 0.7, "u_b": 0.3})
    got = [next(stream)[1]["step"] for _ in range(5)]  # a run of 5 steps: it ends before the update after step 6
    deadline = time.time() + 60
    while not stream._q.full() and time.time() < deadline:  # steps 5 and 6 queued; step 7 waits for the update after 6
        time.sleep(0.01)
    hook.close()  # as the trainer ends: first the weight channel, then the prefetcher
    stream.close()
    assert got == [0, 1, 2, 3, 4]
    assert not stream._thread.is_alive()


# ---- real runs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reweight_corpus(tmp_path_factory):
    """Three und sources (one with shuffled captions: unlearnable), two gen sources, a static manifest and a reference run."""
    root = tmp_path_factory.mktemp("rw")
    tok = make_tokenizer(root / "tokenizer")
    write_source(root, "cap_a", "und", [16], tok, seed=1)
    write_source(root, "cap_b", "und", [16], tok, seed=2)
    write_source(root, "cap_c", "und", [16], tok, seed=5)
    write_source(root, "gen_a", "gen", [16], tok, seed=3)
    write_source(root, "gen_b", "gen", [16], tok, seed=4)
    base = {"name": "rw", "stage": "1", "data_root": str(root), "seq_len": 96, "max_tiles": 1, "thumbnail": False, "tasks": {
        "und": {"global_batch": 4, "sources": {n: {"catalogs": [n], "weight": 1} for n in ("cap_a", "cap_b", "cap_c")}},
        "gen": {"global_batch": 4, "sources": {n: {"catalogs": [n], "weight": 1} for n in ("gen_a", "gen_b")}}}}
    (root / "static.yaml").write_text(yaml.safe_dump(base))
    corpus = {"tokenizer": str(root / "tokenizer"), "mixture": str(root / "static.yaml")}
    # the reference run's per-source losses, written as a run writes them: gen_a's reference is far below any loss the
    # online run can have (large excess), gen_b's far above (no excess), so doremi must move weight to gen_a whatever
    # samples the shuffle puts first (a real static run's losses differ from the online run's only by noise)
    ref = root / "ref"
    ref.mkdir()
    (ref / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "source_loss/gen_a": 0.0, "source_loss/gen_b": 1e3}) + "\n"
                                               for s in range(1, 7)))
    online = json.loads(json.dumps(base))
    # exp3's exploration keeps 3 arms uniform for its first 3 updates (eps = min(1/K, sqrt(ln K / (K t)))): update every step
    online["tasks"]["und"]["reweight"] = {"policy": "exp3", "every": 1, "warmup": 1, "lag": 1, "floor": 0.1, "max_change": 0.2, "eta": 5}
    online["tasks"]["gen"]["reweight"] = {"policy": "doremi", "every": 3, "lag": 2, "floor": 0.1, "eta": 20,
                                          "reference": str(ref / "metrics.jsonl")}
    (root / "online.yaml").write_text(yaml.safe_dump(online))
    return {"tokenizer": corpus["tokenizer"], "mixture": str(root / "online.yaml")}


def weights_by_step(out: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("weight/")} for r in read_metrics(out / "metrics.jsonl")}


def test_two_ranks_compute_the_same_weights_and_one_rank_resuming_them_reads_the_same_losses(tmp_path, reweight_corpus):
    # ZeRO-0: DeepSpeed cannot repartition a ZeRO-2 optimizer state onto another number of ranks
    cfg = write_train_config(tmp_path / "two.yaml", reweight_corpus, tmp_path / "two", steps=8, save_every=4)
    cmd = [str(BIN / "deepspeed"), "--no_local_rank", "--num_gpus", "2", "--master_port", str(free_port()),
           str(BIN / "synergen"), "train", str(cfg)]
    res = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    client = torch.load(next((tmp_path / "two/checkpoints/step_00000008").glob("*model_states.pt")), weights_only=False)
    loaders = client["loader_states"]
    assert len(loaders) == 2 and loaders[0]["mix"] == loaders[1]["mix"]  # both ranks' planners: same weights, same credit
    history = client["reweight"]["history"]
    assert [h[0] for h in history["und"]] == list(range(2, 9)) and [h[0] for h in history["gen"]] == [3, 6]
    # the weights the loader sampled with at the last step are the last update that was due: after 6 (6 + 1 + lag 1 = 8)
    last = weights_by_step(tmp_path / "two")[8]
    assert {k.split("/")[-1]: v for k, v in last.items() if "/und/" in k} == history["und"][4][2]
    assert {k.split("/")[-1]: v for k, v in last.items() if "/gen/" in k} == history["gen"][0][2]  # after 3 (3 + 1 + lag 2 <= 8)
    assert history["und"][4][2] != pytest.approx({"cap_a": 1 / 3, "cap_b": 1 / 3, "cap_c": 1 / 3})
    assert history["gen"][0][2] != pytest.approx({"gen_a": 0.5, "gen_b": 0.5})

    # resumed from step 4 on one rank: step 5 trains the same documents from the same model, so the policy reads the
    # same per-source losses (bit for bit, whatever the split) and computes the same update; later steps cannot match,
    # as the model trains differently on one rank (each rank's loss is normalised over its own targets)
    shutil.copytree(tmp_path / "two", tmp_path / "one", ignore=shutil.ignore_patterns("step_00000008", "cache"))
    one = write_train_config(tmp_path / "one.yaml", reweight_corpus, tmp_path / "one", steps=5, save_every=1)
    res = subprocess.run([str(BIN / "synergen"), "train", str(one), "--resume"], env=clean_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = torch.load(next((tmp_path / "one/checkpoints/step_00000005").glob("*model_states.pt")), weights_only=False)
    assert resumed["reweight"]["history"]["und"][3] == history["und"][3]  # the update after step 5
    a, b = (next(r for r in read_metrics(tmp_path / d / "metrics.jsonl") if r["step"] == 5) for d in ("two", "one"))
    assert b["mixture"]["tasks"]["und"]["global"] == a["mixture"]["tasks"]["und"]["global"]
    assert {k: v for k, v in b.items() if k.startswith("source_loss/")} == {k: v for k, v in a.items() if k.startswith("source_loss/")}


def test_online_reweighting_trains_with_grad_accum_from_the_losses_of_every_micro_step(tmp_path, reweight_corpus):
    from train.config import TrainConfig
    from train.trainer import train

    steps = 6
    cfg = TrainConfig.load(str(write_train_config(tmp_path / "accum.yaml", reweight_corpus, tmp_path / "accum", steps=steps,
                                                  save_every=steps, grad_accum=2)))
    result = train(cfg)
    assert result.last_step == steps
    records = read_metrics(tmp_path / "accum/metrics.jsonl")
    assert [r["mixture"]["step"] for r in records] == [2 * t - 1 for t in range(1, steps + 1)]  # 2 loader steps per step
    client = torch.load(next((tmp_path / f"accum/checkpoints/step_{steps:08d}").glob("*model_states.pt")), weights_only=False)
    history = client["reweight"]["history"]["und"]
    assert [h[:2] for h in history] == [[s, (s + 1) * 2] for s in range(2, steps + 1)]  # applies at loader step (s + lag) x 2
    # exp3 every step: replaying the policy on each step's per-source losses (both micro-steps, as logged) gives its weights
    spec = MixtureManifest.load(reweight_corpus["mixture"]).tasks["und"].reweight
    state = initial_state({n: 1 / 3 for n in ("cap_a", "cap_b", "cap_c")})
    for r in records[1:]:
        state = update(spec, state, {n: r[f"source_loss/{n}"] for n in state["weights"] if f"source_loss/{n}" in r})
        assert state["weights"] == history[r["step"] - 2][2]
    for r in records:  # step t samples with the update after step t - 1 - lag (lag 1), from its first micro-step on
        due = r["step"] - 2
        want = history[due - 2][2] if due >= 2 else {n: 1 / 3 for n in ("cap_a", "cap_b", "cap_c")}
        assert {k.split("/")[-1]: v for k, v in r.items() if k.startswith("weight/und/")} == pytest.approx(want, abs=0)


def test_sigkilled_run_resumes_with_the_same_batches_and_weight_trajectory(tmp_path, reweight_corpus):
    steps = 12
    synergen = str(BIN / "synergen")
    full = write_train_config(tmp_path / "full.yaml", reweight_corpus, tmp_path / "full", steps=steps, save_every=4)
    killed_out = tmp_path / "killed"
    killed = write_train_config(tmp_path / "killed.yaml", reweight_corpus, killed_out, steps=steps, save_every=4)
    proc = subprocess.Popen([synergen, "train", str(killed)], env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed_out / "checkpoints/step_00000008" / MARKER
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, "training stopped before its step-8 checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_tags(killed_out / "checkpoints")[-1][0] < steps, "the run finished before it was killed"
    subprocess.run([synergen, "train", str(full)], env=clean_env(), check=True, capture_output=True, timeout=300)
    res = subprocess.run([synergen, "train", str(killed), "--resume"], env=clean_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    a, b = read_metrics(tmp_path / "full/metrics.jsonl"), read_metrics(killed_out / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):  # the same batches (mixture tallies), losses and weights, bit for bit
        assert rb["mixture"]["tasks"] == ra["mixture"]["tasks"] and rb["loss"] == ra["loss"]
        assert {k: v for k, v in rb.items() if k.startswith("weight/")} == {k: v for k, v in ra.items() if k.startswith("weight/")}
    trajectory = [tuple(sorted(w.items())) for w in weights_by_step(tmp_path / "full").values()]
    assert len(set(trajectory)) >= 4  # the weights did move, several times
    png = plot_weights({"full": tmp_path / "full/metrics.jsonl"}, tmp_path / "weights.png")  # as in the demo report
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # `synergen mix --run` sets the plan (at the starting weights) beside what the run drew
    from typer.testing import CliRunner

    from synergen.cli import app

    out = CliRunner().invoke(app, ["mix", "--run", str(tmp_path / "full")], env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    assert "cap_a" in out.output and "reweighted online (exp3" in out.output
    assert (tmp_path / "full/mix_plan_vs_run.png").read_bytes()[:4] == b"\x89PNG"
    realised = read_metrics(tmp_path / "full/metrics.jsonl")[-1]["mixture"]["cumulative"]["und"]["cap_a"]["samples"]
    row = next(line for line in out.output.splitlines() if " cap_a " in line)
    assert f" {realised:,} " in row  # the realised column is the loader's own count
