"""A real tritonserver (the one bundled with nvidia-pytriton, Python backend, CPU) serving a generated
repository: every model loads, the BLS upscaler returns the in-process runtime's image over HTTP and
gRPC, concurrent clients get their own images, and malformed requests get errors without harming it."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from qdit4sr.models.images import load_photo
from tests.helpers.micro_export import single_thread

http = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (pip install '.[serve]')")
grpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (pip install '.[serve]')")
from tritonclient.utils import InferenceServerException  # noqa: E402

UPSCALE = "qdit4sr_upscale"


def _crop(top: int, left: int, height: int = 16, width: int = 16) -> np.ndarray:
    return np.ascontiguousarray(load_photo("astronaut")[top:top + height, left:left + width])


def _inputs(module, image: np.ndarray, seed: int | None, image_dtype: str = "UINT8"):
    inputs = [module.InferInput("image", list(image.shape), image_dtype)]
    inputs[0].set_data_from_numpy(image)
    if seed is not None:
        inputs.append(module.InferInput("seed", [1], "INT64"))
        inputs[1].set_data_from_numpy(np.array([seed], dtype=np.int64))
    return inputs


def _upscale(module, url: str, image: np.ndarray, seed: int | None, **kw) -> np.ndarray:
    client = module.InferenceServerClient(url)
    try:
        return client.infer(UPSCALE, _inputs(module, image, seed, **kw)).as_numpy("sr_image")
    finally:
        client.close()


def _reference(pipeline, image: np.ndarray, seed: int) -> np.ndarray:
    with single_thread():
        return pipeline.upscale(image, seed=seed)


def test_server_loads_every_model(triton_server, served_repository):
    client = http.InferenceServerClient(triton_server.http_url)
    try:
        index = client.get_model_repository_index()
        assert sorted(m["name"] for m in index) == sorted(served_repository.models)
        assert all(m["state"] == "READY" for m in index), index
        assert all(client.is_model_ready(name) for name in served_repository.models)
    finally:
        client.close()


def test_upscale_over_http_and_grpc_equals_the_python_runtime(triton_server, reference_pipeline):
    image = _crop(100, 200)
    ref = _reference(reference_pipeline, image, seed=3)
    got_http = _upscale(http, triton_server.http_url, image, 3)
    got_grpc = _upscale(grpc, triton_server.grpc_url, image, 3)
    assert got_http.dtype == np.uint8 and got_http.shape == ref.shape == (64, 64, 3)
    np.testing.assert_array_equal(got_http, ref)
    np.testing.assert_array_equal(got_grpc, ref)
    # The seed reaches the sampler: another seed gives another image.
    assert np.abs(_upscale(http, triton_server.http_url, image, 4).astype(int) - ref).max() > 5



CLIENTS = 8


def _stats(url: str, model: str) -> tuple[int, int, int]:
    """(requests, executions, inferences) of a model so far: fewer executions than requests = batched."""
    client = http.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model)["model_stats"][0]
    finally:
        client.close()
    return int(stats["inference_stats"]["success"]["count"]), int(stats["execution_count"]), \
        int(stats["inference_count"])


def test_concurrent_clients_get_their_own_images(triton_server, reference_pipeline):
    """8 clients at once (HTTP and gRPC mixed), each with its own crop, size and seed, all get the image of
    their request, equal to the in-process runtime's.

    Exact equality holds although the segment models may batch tiles of different requests: every call
    here carries at least 4 tiles, and onnxruntime's CPU kernels give the same per-tile result for any
    batch above 1 (test_segment_model_batches_concurrent_requests checks that on the served model).
    """
    sizes = [(12, 12), (12, 16), (16, 12), (12, 20)]
    jobs = [(_crop(30 * i, 25 * i, *sizes[i % len(sizes)]), 10 + i, (http, grpc)[i % 2]) for i in range(CLIENTS)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(_upscale, module, triton_server.http_url if module is http else triton_server.grpc_url,
                               image, seed) for image, seed, module in jobs]
        results = [f.result(timeout=600) for f in futures]
    refs = [_reference(reference_pipeline, image, seed) for image, seed, _ in jobs]
    for (image, seed, _), got, ref in zip(jobs, results, refs):
        assert got.shape == (image.shape[0] * 4, image.shape[1] * 4, 3)
        np.testing.assert_array_equal(got, ref, err_msg=f"client with seed {seed} got another image")
    # Sanity: the clients' images differ from each other, so a mix-up could not pass.
    assert all(np.abs(refs[0][:48, :48].astype(int) - r[:48, :48]).max() > 10 for r in refs[1:])


def test_segment_model_batches_concurrent_requests(triton_server, tiny_export):
    """Tiles sent at once by 8 clients are merged into fewer executions, and each client gets its own result."""
    from qdit4sr.engines.runtime import SegmentedRunner

    runner = SegmentedRunner(tiny_export, intra_op_num_threads=1)
    rng = np.random.default_rng(0)
    model = "qdit4sr_segment_01"
    requests = []
    for i in range(CLIENTS):
        batch = 2 + i % 3
        feeds = {s.name: rng.standard_normal([batch, *s.shape[1:]]).astype(np.float32) for s in runner.manifest.inputs}
        feeds["timestep"] = np.full(batch, 600.0 - 50 * i, dtype=np.float32)
        requests.append(feeds)

    def call(feeds):
        client = http.InferenceServerClient(triton_server.http_url)
        try:
            inputs = []
            for name, value in feeds.items():
                value = value.reshape(-1, 1) if value.ndim == 1 else value   # config dims [1], reshape []
                inputs.append(http.InferInput(name, list(value.shape), "FP32"))
                inputs[-1].set_data_from_numpy(value)
            return client.infer(model, inputs).as_numpy("velocity")
        finally:
            client.close()

    before = _stats(triton_server.http_url, model)
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(call, requests))
    after = _stats(triton_server.http_url, model)
    requests_done, executions = after[0] - before[0], after[1] - before[1]
    assert requests_done == CLIENTS and executions < CLIENTS, (requests_done, executions)
    assert after[2] - before[2] == sum(len(f["timestep"]) for f in requests)
    for feeds, got in zip(requests, results):
        np.testing.assert_array_equal(got, runner.backend.run(1, feeds))


def test_malformed_requests_get_errors_and_the_server_keeps_serving(triton_server, reference_pipeline):
    image = _crop(40, 40, 8, 8)
    with pytest.raises(InferenceServerException, match="(?i)data ?type|dtype|FP32"):
        _upscale(http, triton_server.http_url, image.astype(np.float32), 1, image_dtype="FP32")
    with pytest.raises(InferenceServerException, match="too small"):
        _upscale(grpc, triton_server.grpc_url, image[:1, :1].copy(), 1)
    with pytest.raises(InferenceServerException, match="seed"):
        _upscale(http, triton_server.http_url, image, None)
    bad_channels = np.zeros((8, 8, 4), dtype=np.uint8)
    with pytest.raises(InferenceServerException):
        _upscale(grpc, triton_server.grpc_url, bad_channels, 1)
    # Still serving, and still right.
    np.testing.assert_array_equal(_upscale(http, triton_server.http_url, image, 5),
                                  _reference(reference_pipeline, image, 5))
    client = http.InferenceServerClient(triton_server.http_url)
    try:
        assert client.is_server_live() and client.is_model_ready(UPSCALE)
    finally:
        client.close()
