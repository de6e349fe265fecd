"""Storage on a local directory and on a real S3-API server: the same calls, the same results."""
import uuid

import pyarrow as pa
import pytest

from learn2pd_core import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return f"{request.getfixturevalue('s3_server')}/{uuid.uuid4().hex}"


def test_parts_round_trip_and_list_in_order(root):
    ds = storage.join(root, "traces")
    assert storage.list_parts(ds) == [] and storage.read_dataset(ds) is None
    a = pa.table({"prompt_id": ["p1", "p2"], "confidence": [[0.1, 0.9], [0.5, 0.5]]})
    b = pa.table({"prompt_id": ["p3"], "confidence": [[1.0, 0.0]]})
    storage.write_table(storage.join(ds, "part-b.parquet"), b)
    storage.write_table(storage.join(ds, "part-a.parquet"), a)
    assert [p.rsplit("/", 1)[1] for p in storage.list_parts(ds)] == ["part-a.parquet", "part-b.parquet"]
    assert storage.read_dataset(ds).to_pylist() == a.to_pylist() + b.to_pylist()
    assert storage.read_dataset(ds, columns=["prompt_id"]).column_names == ["prompt_id"]


def test_json_and_remove(root):
    storage.write_json(storage.join(root, "manifest.json"), {"model": "tiny", "count": 3})
    assert storage.exists(storage.join(root, "manifest.json"))
    assert storage.read_json(storage.join(root, "manifest.json")) == {"model": "tiny", "count": 3}
    storage.remove(root)
    assert not storage.exists(storage.join(root, "manifest.json"))
    storage.remove(root)   # absent: nothing to do


def test_unfinished_parts_are_invisible(root):
    ds = storage.join(root, "references")
    storage.write_table(storage.join(ds, "part-1.parquet"), pa.table({"x": [1]}))
    storage.write_bytes(storage.join(ds, ".part-2.parquet.1234.tmp"), b"half a file")   # an interrupted write
    assert [p.rsplit("/", 1)[1] for p in storage.list_parts(ds)] == ["part-1.parquet"]
    assert storage.read_dataset(ds).to_pylist() == [{"x": 1}]


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(storage.Learn2PDError, match="use a local path or s3://"):
        storage.resolve("gs://bucket/x")
