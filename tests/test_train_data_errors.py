"""`synergen train` on data that turns out bad while streaming: one clear error line and exit code 2, never a
traceback, whether the sample is read in the trainer's process or in a DataLoader worker."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from synergen.cli import app
from tests.train_corpus import make_corpus, write_train_config


@pytest.fixture(scope="module")
def corrupt_corpus(tmp_path_factory):
    """The trainer's corpus with the payloads of one gen shard damaged after tokenizing (its index is intact)."""
    root = tmp_path_factory.mktemp("corrupt")
    corpus = make_corpus(root / "c")
    tar = root / "c/gen_a/gen_a-00001.tar"
    data = bytearray(tar.read_bytes())
    for off in range(2000, len(data) - 2000, 700):
        data[off] ^= 0xFF
    tar.write_bytes(bytes(data))
    return corpus, tar


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_shard_found_corrupt_while_training_gives_one_error_line_and_exit_2(tmp_path, corrupt_corpus, num_workers):
    corpus, tar = corrupt_corpus
    cfg = write_train_config(tmp_path / "t.yaml", corpus, tmp_path / "out", steps=6, num_workers=num_workers)
    res = CliRunner().invoke(app, ["train", str(cfg)])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "DataLoader worker" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(tar) in errors[0] and "on_bad_shard='skip'" in errors[0]
    assert not (Path(tmp_path) / "out/checkpoints/step_00000006").exists()
