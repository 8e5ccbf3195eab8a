"""The shared external-data file: content-addressed, aligned, small tensors inline, one hash as written."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdit4sr.exporter.external_data import ALIGNMENT, WEIGHTS_FILE, WeightStore
from qdit4sr.fileio import sha256_file


def test_weight_store_dedupes_by_content(tmp_path):
    with WeightStore(tmp_path / WEIGHTS_FILE, threshold_bytes=64) as store:
        a = store.array("a", np.arange(100, dtype=np.float32))
        b = store.array("b", np.arange(100, dtype=np.float32).reshape(10, 10))  # same bytes, other shape
        c = store.array("c", np.arange(100, dtype=np.int32))                    # other bytes
        small = store.array("s", np.ones(3, dtype=np.float32))
    where = {t.name: {e.key: e.value for e in t.external_data} for t in (a, b, c)}
    assert where["a"]["offset"] == where["b"]["offset"] != where["c"]["offset"]
    assert int(where["c"]["offset"]) % 64 == 0
    assert small.data_location != TensorProto.EXTERNAL and len(small.raw_data) == 12
    assert (tmp_path / WEIGHTS_FILE).stat().st_size == int(where["c"]["offset"]) + 400
    assert store.requested_bytes == 1200 and store.num_blobs == 2


def test_externalize_moves_large_initializers_and_the_file_hash_is_the_written_bytes(tmp_path):
    big = numpy_helper.from_array(np.arange(64, dtype=np.float32), "big")
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [40], np.ones(40, np.float32).tolist())  # float_data
    small = numpy_helper.from_array(np.ones(2, dtype=np.float32), "small")
    graph = helper.make_graph([], "g", [], [], initializer=[big, typed, small])
    model = helper.make_model(graph)
    with WeightStore(tmp_path / WEIGHTS_FILE, threshold_bytes=100) as store:
        store.externalize(model)
        twin = store.array("twin", np.arange(64, dtype=np.float32))  # same bytes as "big": no new blob
    inits = {t.name: t for t in model.graph.initializer}
    assert inits["big"].data_location == TensorProto.EXTERNAL and not inits["big"].HasField("raw_data")
    assert inits["typed"].data_location == TensorProto.EXTERNAL and not inits["typed"].float_data
    assert inits["small"].data_location != TensorProto.EXTERNAL
    assert {e.key: e.value for e in twin.external_data} == {e.key: e.value for e in inits["big"].external_data}
    assert store.num_blobs == 2 and store.sha256 == sha256_file(tmp_path / WEIGHTS_FILE)
    offsets = [int({e.key: e.value for e in t.external_data}["offset"]) for t in (inits["big"], inits["typed"])]
    assert all(o % ALIGNMENT == 0 for o in offsets)
    onnx.save(model, tmp_path / "g.onnx")  # the graph loads back with its external data
    loaded = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "g.onnx").graph.initializer}
    assert np.array_equal(loaded["big"], np.arange(64, dtype=np.float32)) and loaded["typed"].sum() == 40


def test_int4_without_raw_bytes_and_negative_threshold_are_refused(tmp_path):
    with pytest.raises(ValueError, match=">= 0"):
        WeightStore(tmp_path / "w.bin", threshold_bytes=-1)
    int4 = helper.make_tensor("codes", TensorProto.INT4, [256], [1] * 256)
    model = helper.make_model(helper.make_graph([], "g", [], [], initializer=[int4]))
    with WeightStore(tmp_path / WEIGHTS_FILE, threshold_bytes=16) as store:
        with pytest.raises(ValueError, match="only raw_data"):
            store.externalize(model)
