"""bench.records: a run adds its records after those already in the file, making the folder if needed."""

import json

from bench.records import append_records, read_records, write_records


def test_records_accumulate_across_runs(tmp_path, capsys):
    path = tmp_path / "new" / "folder" / "gpu.json"
    assert read_records(path) == []
    assert append_records(path, {"run": 1}) == path
    append_records(path, {"run": 2}, {"run": 3})
    assert json.loads(path.read_text()) == [{"run": 1}, {"run": 2}, {"run": 3}]
    assert f"appended to {path}" in capsys.readouterr().out
    write_records(path, read_records(path)[:1])  # a rewrite (bench.run saves after every case) replaces
    assert read_records(path) == [{"run": 1}]
