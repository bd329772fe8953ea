"""scaling/atomic_json.py: a JSON file is written whole, and a failed write keeps the previous one."""

import json

import pytest

from scaling.atomic_json import write_json


def test_write_creates_the_folder_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a" / "b.json"
    assert write_json(str(path), {"x": 1}, indent=2) == str(path)
    assert json.loads(path.read_text()) == {"x": 1} and path.read_text().endswith("}\n")
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.json"]


def test_a_write_that_fails_midway_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "r.json")
    write_json(path, {"rows": [1]})
    with pytest.raises(TypeError):
        write_json(path, {"rows": [1, object()]})  # not serializable: json.dump stops partway
    assert json.loads(open(path).read()) == {"rows": [1]}
