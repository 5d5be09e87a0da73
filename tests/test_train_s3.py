"""From a pretrained LLM on S3 to generated samples, as a user runs it: `synergen init` -> `synergen train`
(the shipped stage-1 config pointed at moto's S3 and tiny sizes) -> `synergen train --resume` -> `synergen generate`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from llm_kit import qwen_style_tokenizer, tiny_qwen2_folder
from PIL import Image
from transformers import Emu3VQVAE
from typer.testing import CliRunner

from model.vq import VQTokenizer, tiny_emu3_config
from synergen import storage
from synergen.cli import app
from tests.train_corpus import CODEBOOK, make_corpus
from train.checkpoint import MARKER, check_tag, list_tags

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> str:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r.output


def test_init_train_resume_and_generate_with_every_model_file_on_s3(tmp_path, s3):
    torch.set_num_threads(1)
    root = f"{s3}/e2e"
    tok = qwen_style_tokenizer(tmp_path / "llm")
    tiny_qwen2_folder(tmp_path / "llm", vocab_size=len(tok), tied=True)
    storage.publish_dir(str(tmp_path / "llm"), f"{root}/llm")
    torch.manual_seed(0)
    VQTokenizer(Emu3VQVAE(tiny_emu3_config(codebook_size=CODEBOOK))).save_pretrained(str(tmp_path / "vq"))

    cli("init", f"{root}/llm", "--out", f"{root}/init", "--vq", str(tmp_path / "vq"), "--image-size", "64", "--fold", "2x4",
        "--head-layers", "1")
    # The captions are tokenized with the tokenizer init wrote (as `synergen tokenize --tokenizer s3://.../init` would).
    storage.download_dir(f"{root}/init", str(tmp_path / "init_tok"))
    corpus = make_corpus(tmp_path / "data", tokenizer_dir=tmp_path / "init_tok")

    cfg = yaml.safe_load((REPO / "infra/train/stage1.yaml").read_text())
    cfg.update(model=f"{root}/init", tokenizer=f"{root}/init", mixture=corpus["mixture"], data_root=None, num_workers=0,
               data_options={"cache_dir": str(tmp_path / "cache")}, deepspeed=str(REPO / "infra/deepspeed/zero0_cpu.json"),
               precision="fp32", steps=4, output_dir=f"{root}/run", local_dir=str(tmp_path / "staging"), save_every=2,
               log_every=1, lr=1e-3, warmup_steps=1)
    (tmp_path / "stage1.yaml").write_text(yaml.safe_dump(cfg))

    out = cli("train", str(tmp_path / "stage1.yaml"), "--steps", "2")
    assert "trained steps 1..2" in out
    assert list_tags(f"{root}/run/checkpoints") == [(2, "step_00000002")]
    shutil.rmtree(tmp_path / "staging")  # a fresh machine: resume reads everything back from S3
    out = cli("train", str(tmp_path / "stage1.yaml"), "--resume")
    assert "trained steps 3..4" in out

    ckpts = f"{root}/run/checkpoints"
    assert [s for s, _ in list_tags(ckpts)] == [2, 4]
    assert all(check_tag(ckpts, tag) is None for _, tag in list_tags(ckpts))
    assert json.loads(storage.read_bytes(f"{ckpts}/step_00000004/{MARKER}"))["step"] == 4
    metrics = [json.loads(line) for line in storage.read_bytes(f"{root}/run/metrics.jsonl").decode().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert yaml.safe_load(storage.read_bytes(f"{root}/run/train_config.yaml"))["output_dir"] == f"{root}/run"
    exported = storage.list_dir(f"{root}/run/model")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(exported)

    cli("generate", f"{root}/run/model", "--vq", str(tmp_path / "vq"), "--caption", "a red circle", "--cfg-scale", "2",
        "--out", str(tmp_path / "gen"))
    assert Image.open(tmp_path / "gen" / "000.png").size == (64, 64)
    out = cli("generate", f"{root}/run/model", "--vq", str(tmp_path / "vq"), "--image", str(tmp_path / "gen" / "000.png"),
              "--max-new-tokens", "4", "--temperature", "0")
    assert f"{tmp_path / 'gen' / '000.png'}\t" in out  # one line per image: path, tab, caption


def test_checkpoint_tags_on_s3_are_usable_only_with_a_matching_completion_marker(tmp_path, s3):
    ckpts = f"{s3}/tags/checkpoints"
    storage.write_bytes(f"{ckpts}/step_00000003/mp_rank_00_model_states.pt", b"12345")
    storage.write_bytes(f"{ckpts}/step_00000006/mp_rank_00_model_states.pt", b"12345")
    storage.write_bytes(f"{ckpts}/not_a_tag/x", b"")
    assert list_tags(ckpts) == [(3, "step_00000003"), (6, "step_00000006")]
    assert check_tag(ckpts, "step_00000006").startswith("partial")
    storage.write_bytes(f"{ckpts}/step_00000006/{MARKER}", json.dumps({"step": 6, "files": {"mp_rank_00_model_states.pt": 9}}).encode())
    assert check_tag(ckpts, "step_00000006") == "file mp_rank_00_model_states.pt has 5 bytes, the marker says 9"
    storage.write_bytes(f"{ckpts}/step_00000003/{MARKER}", json.dumps({"step": 3, "files": {"mp_rank_00_model_states.pt": 5}}).encode())
    assert check_tag(ckpts, "step_00000003") is None
