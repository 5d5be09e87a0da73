"""The real hand-off: demo images served by the local web, ingested by `run_ingest` (img2dataset inside Ray tasks)
to moto S3, then tokenized from S3 (generation) and from a local copy (understanding) with the demo VQ."""

import fsspec
import numpy as np

from synergen.demo.corpus import write_demo_corpus, write_url_list
from pipeline.ingest import run_ingest
from pipeline.tokenization import QualityThresholds, TokenizeConfig, run_tokenize
from pipeline.token_shards import iter_token_shard
from pipeline.catalog import read_catalog
from tokenize_helpers import REPO_TOKENIZER, REPO_VQ


def test_ingest_output_tokenizes_for_both_tasks(ray_cluster, web, s3, tmp_path):
    rows = write_demo_corpus(web.root, n=6, seed=11, size=256)
    urls = write_url_list(rows, web.url(""), str(tmp_path / "urls.parquet"))
    raw = f"{s3}/from_ingest/raw"
    ing = run_ingest("manifests/sources/demo.yaml", raw, shard_size=3, allow_networks=("127.0.0.0/8",), url_lists=[urls])
    assert ing["ok"] == 6
    local_raw = tmp_path / "raw"
    fsspec.filesystem("s3").get(raw.removeprefix("s3://") + "/", str(local_raw) + "/", recursive=True)
    gate = QualityThresholds(min_distinct_codes=16, min_entropy_bits=3.0, min_psnr_db=12.0, max_flagged_share=0.0)
    common = dict(vq=REPO_VQ, tokenizer=REPO_TOKENIZER, fold="2x4", image_size=64, quality=gate, source="demo")
    gen = run_tokenize(TokenizeConfig(raw=raw, out=f"{s3}/from_ingest/tok_gen", task="gen", **common))
    und = run_tokenize(TokenizeConfig(raw=str(local_raw), out=str(tmp_path / "tok_und"), task="und", max_tiles=4,
                                      thumbnail=True, **common))
    captions = {r["caption"] for r in rows}
    for s, out in ((gen, f"{s3}/from_ingest/tok_gen"), (und, str(tmp_path / "tok_und"))):
        assert s["raw_successes"] == s["samples_in"] == s["tokenized"] == 6 and s["filtered"] == {}
        cat = read_catalog(out)
        assert sum(r["samples"] for r in cat) == 6 and {r["source"] for r in cat} == {"demo"}
        samples = [x for r in cat for x in iter_token_shard(f"{out}/{r['path']}")]
        assert {x.meta["caption"] for x in samples} == captions
        assert all(x.meta["url"].startswith(web.url("files/")) for x in samples)
    tiles = [x.codes.shape[0] for r in read_catalog(str(tmp_path / "tok_und"))
             for x in iter_token_shard(str(tmp_path / "tok_und" / r["path"]))]
    assert tiles == [5] * 6  # 256 px square at 64-px tiles: 2x2 tiles + thumbnail
    assert np.all([r["fold"] == "2x4" for r in read_catalog(f"{s3}/from_ingest/tok_gen")])
