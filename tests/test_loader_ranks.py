"""Ranks agree on what to skip: 2 ranks (2 processes joined by torch.distributed over gloo) x 2 DataLoader workers,
where one rank's node cannot see a shard."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import torch.multiprocessing as mp

from loader_corpus import make_tokenizer, manifest, stream, write_source

STEPS = 3


def _rank(rank: int, roots: list[str], init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        tok = make_tokenizer()
        mf = manifest(roots[rank], tasks={"gen": {"global_batch": 6, "sources": {"gen_a": {"catalogs": ["gen_a"], "weight": 1}}}})
        got, loader = stream(roots[rank], tok, STEPS, workers=2, rank=rank, world=2, mf=mf, on_bad_shard="skip",
                             cache_dir=f"{out}/cache{rank}")
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"keys": [k for sb in got for k in sb.samples["gen"]], "state": loader.state_dict(),
                       "plans": [sb.report["tasks"]["gen"]["global"] for sb in got]}, f)
    finally:
        dist.destroy_process_group()


def test_a_shard_one_node_cannot_see_is_skipped_by_every_rank(tmp_path):
    tok = make_tokenizer()
    seen = str(tmp_path / "node0")
    write_source(seen, "gen_a", "gen", [6, 6, 6], tok, seed=9)
    blind = str(tmp_path / "node1")
    shutil.copytree(seen, blind)
    for f in ("gen_a-00001.tar", "gen_a-00001.tar.idx.npy"):  # gone from rank 1's view only (same catalog)
        (tmp_path / "node1" / "gen_a" / f).unlink()
    # spawn, not fork: a forked child would inherit any process group an earlier test left in this pytest process
    mp.start_processes(_rank, args=([seen, blind], str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    r0["state"].pop("mixture"), r1["state"].pop("mixture")  # the mixture id names its data root, which differs here
    assert r0["state"] == r1["state"] and r0["plans"] == r1["plans"]  # one plan, one state
    assert len(r0["state"]["skip"]) == 1
    keys = Counter(tuple(k) for k in r0["keys"] + r1["keys"])
    assert len(keys) == STEPS * 6 and set(keys.values()) == {1}  # 3 batches of 6 over 12 usable samples: 2 epochs, none twice
    assert not any(k[2].startswith("gen_a-001-") for k in keys)
    for epoch in (0, 1):
        assert len([k for k in keys if k[1] == epoch]) <= 12
