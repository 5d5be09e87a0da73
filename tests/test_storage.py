"""synergen.storage: one answer to "local or remote?", URL joins that keep `s3://`, atomic folder publishing."""

from __future__ import annotations

import pytest

from synergen import storage


def test_local_and_remote_urls_are_told_apart_and_joined_without_losing_the_scheme(tmp_path):
    assert storage.is_local(str(tmp_path)) and storage.is_local(f"file://{tmp_path}")
    assert not storage.is_local("s3://bucket/run")
    assert storage.join("s3://bucket/run/", "checkpoints", "step_1/") == "s3://bucket/run/checkpoints/step_1"
    assert storage.local_path(f"file://{tmp_path}") == str(tmp_path)


def test_a_staged_folder_appears_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "model"
    with storage.staged_dir(str(dest)) as tmp:
        (tmp_path / "model").exists() and pytest.fail("published before the block ended")
        open(f"{tmp}/a.txt", "w").write("one")
    assert (dest / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError), storage.staged_dir(str(dest)) as tmp:
        open(f"{tmp}/b.txt", "w").write("half")
        raise RuntimeError("writer died")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # old folder intact, no temporary left
    assert [p.name for p in dest.iterdir()] == ["a.txt"]
    with storage.staged_dir(str(dest)) as tmp:
        open(f"{tmp}/c.txt", "w").write("new")
    assert [p.name for p in dest.iterdir()] == ["c.txt"]  # replaced as a whole


def test_folders_round_trip_through_s3_with_sizes_and_a_skipped_marker(tmp_path, s3):
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "w.bin").write_bytes(b"x" * 10)
    (tmp_path / "src" / "_complete.json").write_text("{}")
    url = f"{s3}/storage-test/folder"
    storage.publish_dir(str(tmp_path / "src"), url, skip=("_complete.json",))
    assert storage.file_sizes(url) == {"sub/w.bin": 10}
    with storage.local_copy(url) as path:
        assert open(f"{path}/sub/w.bin", "rb").read() == b"x" * 10
    storage.write_bytes(f"{url}/_complete.json", b"{}")
    assert storage.list_dir(url) == ["_complete.json", "sub"]
    storage.remove(url)
    assert not storage.exists(url) and storage.list_dir(url) == []
    with pytest.raises(storage.StorageError, match="no files under"), storage.local_copy(url):
        pass
