"""Ingest on a real multi-node Ray cluster (head + 3 worker raylets on loopback) that loses a whole node mid-job."""

import glob
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from tests.multinode import kill_node, multinode_cluster, node_of_process, processes_named

REPO = Path(__file__).resolve().parents[1]
DRIVER = """
import json, sys
from pipeline.ingest import run_ingest
from pipeline.sources import SourceManifest
m = SourceManifest.model_validate_json(sys.argv[1])
s = run_ingest(m, sys.argv[2], shard_size=2, allow_networks=("127.0.0.0/8",), ray_address=sys.argv[3], timeout=300,
               download_deadline_s=300,
               dedup_actors=4, row_index_actors=6, thread_count=4)
print("SUMMARY " + json.dumps(s))
"""


def _driver(m, out, address):
    return subprocess.Popen([sys.executable, "-c", DRIVER, m.model_dump_json(), out, address], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _summary(proc, timeout=300):
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"the ingest driver ran past {timeout} s; its log:\n{stderr[-4000:]}") from None
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("SUMMARY "))[8:])


def test_job_survives_losing_the_node_of_a_dedup_and_a_row_index_actor_and_shards_spread_over_nodes(web, tmp_path):
    from pipeline.sources import SourceManifest

    for i in range(12):
        Image.new("RGB", (80, 80), (i * 11 % 255, 200 - i * 7, 60)).save(web.root / f"i{i}.jpg")
    (web.root / "copy.jpg").write_bytes((web.root / "i0.jpg").read_bytes())
    # shard 0 (rows 0-1) downloads at once; every later shard waits on the server until the node is gone, so the
    # kill lands mid-job however fast the machine is
    urls = [web.url(f"files/i{i}.jpg") for i in range(2)] + [web.url(f"held/i{i}.jpg") for i in range(2, 12)]
    urls.append(web.url("files/copy.jpg"))
    pq.write_table(pa.table({"url": urls, "caption": [f"image {i}" for i in range(len(urls))]}), tmp_path / "l.parquet")
    m = SourceManifest(name="mn", task="gen", url_lists=[str(tmp_path / "l.parquet")], filters={"dedup_near": False})
    out = str(tmp_path / "out")
    with multinode_cluster(workers=3) as (cluster, _):
        proc = _driver(m, out, cluster.address)
        web.hold_for(400)  # a loaded machine may take minutes to publish the first shard: held downloads wait
        killed, seen = None, set()
        deadline = time.time() + 240
        while killed is None and time.time() < deadline and proc.poll() is None:
            # mid-job: a shard published, others running; kill the whole worker node hosting a row-index partition
            # (and a dedup shard, when one node hosts both)
            if glob.glob(f"{out}/_fragments/*.parquet"):
                index_hosts = {node_of_process(cluster, pid) for pid in processes_named("RowIndexPart")}
                seen |= {"head" if n is cluster.head_node else "worker" if n else "unknown" for n in index_hosts}
                dedup_hosts = {node_of_process(cluster, pid) for pid in processes_named("DedupShard")}
                workers = [n for n in cluster.worker_nodes if n in index_hosts]
                victim = next((n for n in workers if n in dedup_hosts), workers[0] if workers else None)
                if victim is not None:
                    kill_node(cluster, victim)  # the GCS knows it is dead before the held downloads go on
                    killed = victim
            time.sleep(0.1)
        web.release()
        s = _summary(proc)
        assert killed is not None, f"the job ended before a node could be killed (row-index partitions on: {seen})"
        assert not Path(f"{out}/_staging").exists() or not any(Path(f"{out}/_staging").iterdir())
        assert s["shards_failed"] == {} and s["rows_in"] == len(urls) == s["ok"] + s["filtered"]
        assert s["row_index_parts"] == 6 and s["row_index_rebuilds"] >= 1  # rebuilt from the planned shards
        assert s["filtered_by_reason"] == {"duplicate_exact": 1} and s["ok"] == 12
        assert len(s["shards_by_node"]) >= 2  # tasks ran on several nodes
        # every input row exactly once across the shard parquets; every kept image in exactly one tar
        rows = pa.concat_tables([pq.read_table(p) for p in sorted(glob.glob(f"{out}/[0-9]*.parquet"))])
        assert sorted(rows.column("url").to_pylist()) == sorted(urls)
        samples = list(wds.WebDataset(sorted(glob.glob(f"{out}/*.tar")), shardshuffle=False))
        assert len(samples) == 12 and len({json.loads(x["json"])["url"] for x in samples}) == 12
        ledger = pq.read_table(f"{out}/_ledger.parquet")
        assert ledger.num_rows == len(urls) and set(ledger.column("state").to_pylist()) == {"ok", "filtered"}
        # a re-run on the smaller cluster does nothing
        hits = sum(web.hits.values())
        s2 = _summary(_driver(m, out, cluster.address))
        assert s2["shards_this_run"] == 0 and s2["ok"] == 12 and sum(web.hits.values()) == hits
