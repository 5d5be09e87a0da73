"""infra/ is consistent with itself and with the code: every YAML parses, images, commands and resources
agree across the Ray launcher config, the KubeRay manifests, the Dockerfile and the CLI; every shipped
DeepSpeed config is accepted by `deepspeed.initialize` for the tiny model on CPU.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
IMAGE_REPO = "ghcr.io/your-org/synergen"
CPU_IMAGE, GPU_IMAGE = f"{IMAGE_REPO}:{VERSION}-cpu", f"{IMAGE_REPO}:{VERSION}-gpu"
KUBERAY = {p.name: yaml.safe_load(p.read_text()) for p in sorted((INFRA / "kuberay").glob("*.yaml"))}
LAUNCHER = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
DOCKERFILE = (INFRA / "docker" / "Dockerfile").read_text()


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def containers(spec: dict):
    """(group name, container) for the head and every worker group of a RayCluster spec."""
    for c in spec["headGroupSpec"]["template"]["spec"]["containers"]:
        yield "head", c
    for g in spec["workerGroupSpecs"]:
        for c in g["template"]["spec"]["containers"]:
            yield g["groupName"], c


def dockerfile_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.M)
    assert m, f"Dockerfile declares no default for ARG {name}"
    return m.group(1)


def test_every_yaml_in_infra_parses():
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert {"cluster.yaml", "raycluster.yaml", "rayjob-ingest.yaml", "rayjob-tokenize.yaml"} <= {f.name for f in files}
    for f in files:
        docs = list(yaml.safe_load_all(f.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), f"{f}: expected mappings"


def test_launcher_config_passes_rays_own_schema_and_bounds():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(json.loads(json.dumps(LAUNCHER))))
    types = LAUNCHER["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"} and LAUNCHER["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}, "the head must not run tasks"
    for name, t in types.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        assert t["node_config"]["MetadataOptions"]["HttpPutResponseHopLimit"] >= 2, f"{name}: containers cannot reach IMDSv2"
        assert "IamInstanceProfile" in t["node_config"], f"{name}: S3 access comes from the instance profile"
    assert sum(t["max_workers"] for t in types.values()) <= LAUNCHER["max_workers"]
    # The CPU image everywhere except on GPU instances, which take the GPU image.
    assert LAUNCHER["docker"]["image"] == CPU_IMAGE
    assert types["gpu_worker"]["docker"]["worker_image"] == GPU_IMAGE
    assert re.match(r"(g|p)\d", types["gpu_worker"]["node_config"]["InstanceType"])
    assert not re.match(r"(g|p)\d", types["cpu_worker"]["node_config"]["InstanceType"])
    assert not any("pip install" in c for k in ("setup_commands", "head_setup_commands", "worker_setup_commands")
                   for c in LAUNCHER[k]), "everything must come from the image"


def test_kuberay_groups_images_and_resources_agree():
    ray_version = __import__("ray").__version__
    assert dockerfile_arg("RAY_VERSION") == ray_version
    for name, doc in KUBERAY.items():
        assert doc["apiVersion"] == "ray.io/v1", name
        spec = cluster_spec(doc)
        assert spec["rayVersion"] == ray_version, f"{name}: rayVersion must equal the image's Ray ({ray_version})"
        assert spec["enableInTreeAutoscaling"] is True, name
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", f"{name}: the head must not run tasks"
        for g in spec["workerGroupSpecs"]:
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{name}/{g['groupName']}"
        for group, c in containers(spec):
            res = c["resources"]
            assert res["requests"] == res["limits"], f"{name}/{group}: Ray sizes itself from the limits"
            gpus = int(res["limits"].get("nvidia.com/gpu", 0))
            assert c["image"] == (GPU_IMAGE if gpus else CPU_IMAGE), f"{name}/{group}: image {c['image']}"
            assert (group == "gpu-workers") == (gpus > 0), f"{name}/{group}: GPUs only in the GPU group"
            assert any(v["mountPath"] == "/dev/shm" for v in c["volumeMounts"]), f"{name}/{group}: object store needs /dev/shm"


def test_kuberay_s3_credentials_come_from_a_secret_never_a_literal():
    for name, doc in KUBERAY.items():
        for group, c in containers(cluster_spec(doc)):
            env = {e["name"]: e for e in c["env"]}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert "value" not in env[key], f"{name}/{group}: {key} is a literal"
                ref = env[key]["valueFrom"]["secretKeyRef"]
                assert ref == {"name": "synergen-s3", "key": key, "optional": True}, f"{name}/{group}: {ref}"
    for f in INFRA.rglob("*"):
        if f.is_file():
            text = f.read_text(errors="replace")
            assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{f}: an AWS access key id is baked in"
            assert not re.search(r"AWS_SECRET_ACCESS_KEY\s*[=:]\s*['\"]?[A-Za-z0-9/+]{20,}", text), f"{f}: a secret is baked in"


def test_rayjob_groups_equal_the_raycluster_groups():
    base = cluster_spec(KUBERAY["raycluster.yaml"])
    groups = {g["groupName"]: g for g in base["workerGroupSpecs"]}
    for name in ("rayjob-ingest.yaml", "rayjob-tokenize.yaml"):
        spec = cluster_spec(KUBERAY[name])
        assert spec["headGroupSpec"] == base["headGroupSpec"], name
        for g in spec["workerGroupSpecs"]:
            assert g == groups[g["groupName"]], f"{name}: group {g['groupName']} differs from raycluster.yaml"
        assert {k: v for k, v in spec.items() if k != "workerGroupSpecs"} == \
               {k: v for k, v in base.items() if k != "workerGroupSpecs"}, name
    ingest = {g["groupName"] for g in cluster_spec(KUBERAY["rayjob-ingest.yaml"])["workerGroupSpecs"]}
    tokenize = {g["groupName"] for g in cluster_spec(KUBERAY["rayjob-tokenize.yaml"])["workerGroupSpecs"]}
    assert ingest == {"cpu-workers"} and tokenize == {"cpu-workers", "gpu-workers"}


def check_cli_args(argv: list[str]) -> None:
    """Parse `synergen ...` arguments with the real CLI's parser (typos and missing options fail here)."""
    import typer.main

    from synergen.cli import app

    assert argv[0] == "synergen", argv
    command = typer.main.get_command(app)
    sub = command.get_command(None, argv[1])
    assert sub is not None, f"`synergen {argv[1]}` is not a command"
    sub.make_context(f"synergen {argv[1]}", list(argv[2:]))


@pytest.mark.parametrize("stage", ["ingest", "tokenize"])
def test_rayjob_entrypoints_are_valid_cli_invocations(stage):
    argv = shlex.split(KUBERAY[f"rayjob-{stage}.yaml"]["spec"]["entrypoint"])
    assert argv[:2] == ["synergen", stage]
    check_cli_args(argv)


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_rayjobs_chain_into_the_layout_the_mixtures_read():
    from train.mixture import MixtureManifest

    ingest = shlex.split(KUBERAY["rayjob-ingest.yaml"]["spec"]["entrypoint"])
    tokenize = shlex.split(KUBERAY["rayjob-tokenize.yaml"]["spec"]["entrypoint"])
    source_file = REPO / "manifests" / "sources" / Path(ingest[2]).name
    source = yaml.safe_load(source_file.read_text())
    assert option(ingest, "--out") == option(tokenize, "--raw"), "tokenize must read what ingest wrote"
    assert option(tokenize, "--task") == source["task"]
    # <data_root>/<task>/<source>: a shipped mixture names this catalog.
    token_out = option(tokenize, "--out")
    named = set()
    for path in (REPO / "manifests" / "mixtures").glob("*.yaml"):
        m = MixtureManifest.load(str(path))
        for task in m.tasks.values():
            for spec in task.sources.values():
                named |= {f"{m.data_root.rstrip('/')}/{c}" for c in spec.catalogs}
    assert token_out in named, f"{token_out} is not a catalog any manifests/mixtures/*.yaml reads"
    # The VQ actors fit in the GPU group at its largest (else the job waits forever for GPUs).
    gpu_group = next(g for g in cluster_spec(KUBERAY["rayjob-tokenize.yaml"])["workerGroupSpecs"] if g["groupName"] == "gpu-workers")
    gpus_per_pod = int(gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    wanted = int(option(tokenize, "--concurrency")) * float(option(tokenize, "--gpus-per-actor"))
    assert 0 < wanted <= gpu_group["maxReplicas"] * gpus_per_pod


def documented_commands(text: str, prefix: str) -> list[list[str]]:
    """Every command line in `text` that starts with `prefix` (backslash continuations joined, '#' stripped)."""
    lines = [ln.strip().lstrip("#").strip() for ln in text.splitlines()]
    joined, cmds = "", []
    for ln in lines:
        joined = f"{joined} {ln}".strip() if joined else ln
        if joined.endswith("\\"):
            joined = joined[:-1]
            continue
        # A command: the prefix at the start of the line, after environment assignments only.
        if prefix in joined and re.fullmatch(r"(\w+=\S+\s+)*", joined[:joined.index(prefix)]):
            cmds.append(shlex.split(joined[joined.index(prefix):].split(" #")[0]))
        joined = ""
    return cmds


def test_documented_submit_and_launch_commands_are_valid():
    docs = (INFRA / "README.md").read_text() + "\n".join(
        (INFRA / "launch" / s).read_text() for s in ("submit_ingest.sh", "submit_tokenize.sh", "train_multinode.sh"))
    checked = 0
    for stage in ("ingest", "tokenize"):
        for argv in documented_commands(docs, f"infra/launch/submit_{stage}.sh "):
            if any(a.isupper() or "|" in a or a.startswith("[") for a in argv[1:]):
                continue  # a usage line (MANIFEST, URL, und|gen), not an example
            check_cli_args(["synergen", stage, *argv[1:]])
            checked += 1
    for argv in documented_commands(docs, "infra/launch/train_multinode.sh infra/train/"):
        assert (REPO / argv[1]).is_file(), f"documented train config {argv[1]} does not exist"
        checked += 1
    assert checked >= 4, checked


def test_dockerfile_installs_the_project_like_a_local_install():
    from packaging.specifiers import SpecifierSet
    from packaging.requirements import Requirement

    reqs = {Requirement(r).name: Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
    assert dockerfile_arg("TORCH_VERSION") in reqs["torch"].specifier, "Dockerfile torch pin outside pyproject's range"
    assert dockerfile_arg("RAY_VERSION") in reqs["ray"].specifier
    assert "default" in reqs["ray"].extras, "`ray job submit` and KubeRay's submitter need ray[default]"
    assert re.search(r'pip install --index-url \$\{TORCH_INDEX_URL\} "torch==\$\{TORCH_VERSION\}"', DOCKERFILE)
    assert re.search(r"^RUN pip install (-c requirements\.lock )?\. ", DOCKERFILE, re.M)
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        pkg = pattern.rstrip("*")
        assert f"COPY {pkg} ./{pkg}" in DOCKERFILE, f"package {pkg} is not copied into the image"
    for src in re.findall(r"^COPY (\S+) ", DOCKERFILE, re.M):
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    for base in ("BASE_IMAGE_GPU", "BASE_IMAGE_CPU"):
        assert ":" in dockerfile_arg(base), f"{base} must name a tag"
    assert "cudnn-devel" in dockerfile_arg("BASE_IMAGE_GPU"), "DeepSpeed JIT-builds ops with nvcc"
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore
    readme = (INFRA / "docker" / "README.md").read_text()
    assert "-f infra/docker/Dockerfile" in readme and "VARIANT=cpu" in readme and CPU_IMAGE in readme and GPU_IMAGE in readme


def test_train_configs_load_and_name_shipped_files():
    from train.config import TrainConfig

    configs = sorted((INFRA / "train").glob("*.yaml"))
    assert configs, "no train config in infra/train"
    for path in configs:
        cfg = TrainConfig.load(str(path))
        assert (REPO / cfg.deepspeed).is_file() and cfg.deepspeed.startswith("infra/deepspeed/"), f"{path}: {cfg.deepspeed}"
        assert (REPO / cfg.mixture).is_file(), f"{path}: mixture {cfg.mixture}"


def test_hostfile_example_parses_with_deepspeeds_parser():
    from deepspeed.launcher.runner import _parse_hostfile

    pool = _parse_hostfile((INFRA / "launch" / "hostfile.example").read_text().splitlines(keepends=True))
    assert len(pool) >= 2 and all(slots >= 1 for slots in pool.values())
    script = (INFRA / "launch" / "train_multinode.sh").read_text()
    assert "HOSTFILE=${HOSTFILE:-/job/hostfile}" in script and "/job/hostfile" in (INFRA / "launch" / "hostfile.example").read_text()


@pytest.mark.parametrize("script", ["train_multinode.sh", "submit_ingest.sh", "submit_tokenize.sh"])
def test_launch_scripts_are_valid_and_refuse_missing_arguments(script, tmp_path):
    path = INFRA / "launch" / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)
    r = subprocess.run([str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr


def test_train_launch_names_the_missing_hostfile(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("{}")
    missing = tmp_path / "nohostfile"
    r = subprocess.run([str(INFRA / "launch" / "train_multinode.sh"), str(config)], capture_output=True, text=True,
                       env={**os.environ, "HOSTFILE": str(missing)}, timeout=30)
    assert r.returncode == 2 and str(missing) in r.stderr and "hostfile.example" in r.stderr


@pytest.mark.parametrize("script,stage", [("submit_ingest.sh", "ingest"), ("submit_tokenize.sh", "tokenize")])
def test_submit_scripts_run_the_stage_command(script, stage):
    text = (INFRA / "launch" / script).read_text()
    assert "job submit" in text and "--working-dir ." in text and f"-- synergen {stage} \"$@\"" in text


DS_CHECK = r"""
import json, os, socket, sys
import deepspeed, torch
from model.config import preset_config
from model.modeling import SynerGenVLForCausalLM
from train.config import TrainConfig
from train.trainer import build_optimizer, init_distributed

init_distributed()
out = {}
for path in sys.argv[1:]:
    shipped = json.load(open(path))
    cfg = TrainConfig(model="tiny", mixture="unused.yaml", steps=1, output_dir="unused", deepspeed=path).resolved()
    # 2: the tasks (und, gen) of a pretraining step; precision as shipped, not as this CPU would pick.
    ds = cfg.deepspeed_config(2, bf16=shipped.get("bf16", {}).get("enabled", False))
    model = SynerGenVLForCausalLM(preset_config("tiny"))
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(cfg, model), config=ds)
    out[path] = {"stage": engine.zero_optimization_stage(), "bf16": engine.bfloat16_enabled()}
    del engine, model
print("RESULT " + json.dumps(out))
"""


def test_every_deepspeed_config_is_accepted_by_deepspeed_initialize_on_cpu(tmp_path):
    configs = sorted(str(p.relative_to(REPO)) for p in (INFRA / "deepspeed").glob("*.json"))
    stages = {json.loads((REPO / c).read_text())["zero_optimization"]["stage"] for c in configs}
    assert {1, 2, 3} <= stages, "ZeRO-1/2/3 configs must all be shipped"
    assert any(json.loads((REPO / c).read_text())["bf16"]["enabled"] for c in configs), "no bf16 config shipped"
    # A fresh process: deepspeed's process group and RANK/WORLD_SIZE must not leak into other tests.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-c", DS_CHECK, *configs], cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.split("RESULT ", 1)[1])
    for c in configs:
        shipped = json.loads((REPO / c).read_text())
        assert result[c] == {"stage": shipped["zero_optimization"]["stage"], "bf16": shipped["bf16"]["enabled"]}, c
