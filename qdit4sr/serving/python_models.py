"""The Python-backend models of a generated repository; each version folder's `model.py` imports one.

* `SegmentModel` runs one timestep segment's portable ONNX graph with onnxruntime, with the options of
  the in-process runtime (`qdit4sr.engines.runtime.OrtBackend`), on the requests that Triton's dynamic
  batcher grouped: their tiles are concatenated into one onnxruntime call and split again.
* `UpscaleModel` is the whole super-resolution: `DiT4SRPipeline` rebuilt from the export's manifest
  by `load_exported_pipeline`, the same code as the in-process runtime, with one difference: its
  segment backend (`TritonSegmentBackend`) sends each transformer call to the segment model of the
  current sampler step as a BLS request instead of running a local session. Same seed, same image.

Tensors cross the backend boundary by DLPack only: the numpy conversions of the Python backend built
into the Triton release we test with (`Tensor.as_numpy`, `Tensor(name, ndarray)`) read numpy 1's array
layout and give zeros or empty buffers under numpy 2, which this project requires.

Nothing here imports `triton_python_backend_utils` at module level: it exists only inside the
backend's stub process, and the classes receive it in `initialize`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from . import layout


def _pb_utils():
    import triton_python_backend_utils as pb_utils

    return pb_utils


def _parameters(model_config: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def to_numpy(tensor) -> np.ndarray:
    """A backend tensor (or BLS output) as a numpy array that owns its memory."""
    return np.array(np.from_dlpack(tensor), copy=True)


def to_backend_tensor(pb_utils, name: str, array: np.ndarray):
    """A backend tensor holding `array`, handed over through torch's DLPack capsule."""
    import torch
    from torch.utils.dlpack import to_dlpack

    return pb_utils.Tensor.from_dlpack(name, to_dlpack(torch.from_numpy(np.ascontiguousarray(array))))


def error_response(pb_utils, error: BaseException):
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


# ----------------------------------------------------------------------------- segment graphs

class SegmentModel:
    """One timestep segment's graph (`model.onnx` beside this model's `model.py`) on onnxruntime."""

    def initialize(self, args: dict[str, Any]) -> None:
        import onnxruntime as ort

        self.pb_utils = _pb_utils()
        config = json.loads(args["model_config"])
        params = _parameters(config)
        self.input_names = [t["name"] for t in config["input"]]
        # Inputs with only the batch axis travel as [batch, 1] and are reshaped to [batch] by Triton
        # (config dims [1], reshape []); flattened here too in case a server hands them over unreshaped.
        self.flat = {t["name"] for t in config["input"] if "reshape" in t and not t["reshape"].get("shape")}
        self.output_name = config["output"][0]["name"]
        options = ort.SessionOptions()
        # ORT_ENABLE_BASIC, as the in-process runtime: the extended levels fuse Q/DQ into integer
        # kernels that can be inexact on CPUs without VNNI.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        threads = int(params.get(layout.PARAM_INTRA_OP_THREADS) or 0)
        if threads:
            options.intra_op_num_threads = threads
        providers: list = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}))
        graph = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(graph), options, providers=providers)

    def execute(self, requests: list) -> list:
        pb = self.pb_utils
        try:
            feeds = [{name: to_numpy(pb.get_input_tensor_by_name(r, name)) for name in self.input_names}
                     for r in requests]
            batched = {name: np.concatenate([f[name].reshape(-1) if name in self.flat else f[name] for f in feeds])
                       for name in self.input_names}
            counts = [len(f[self.input_names[0]]) for f in feeds]
            out = self.session.run([self.output_name], batched)[0]
        except Exception as e:  # noqa: BLE001  (every request of the batch gets the error; the model stays up)
            return [error_response(pb, e) for _ in requests]
        parts = np.split(out, np.cumsum(counts)[:-1])
        return [pb.InferenceResponse([to_backend_tensor(pb, self.output_name, part)]) for part in parts]

    def finalize(self) -> None:
        self.session = None


# ----------------------------------------------------------------------------- BLS upscaler

class TritonSegmentBackend:
    """A runtime segment backend (see `qdit4sr.engines.runtime`) whose segments are Triton models."""

    def __init__(self, manifest, models: list[str], pb_utils):
        if len(models) != len(manifest.segments):
            raise ValueError(f"{len(models)} segment models for {len(manifest.segments)} segments")
        self.models = list(models)
        self.pb_utils = pb_utils
        self.output_name = manifest.outputs[0].name
        self.per_item = {spec.name for spec in manifest.inputs if layout.per_item_scalar(spec)}

    def run(self, segment_index: int, feeds: dict[str, np.ndarray]) -> np.ndarray:
        pb = self.pb_utils
        inputs = [to_backend_tensor(pb, name, a.reshape(-1, 1) if name in self.per_item else a)
                  for name, a in feeds.items()]
        request = pb.InferenceRequest(model_name=self.models[segment_index], inputs=inputs,
                                      requested_output_names=[self.output_name])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.models[segment_index]}: {response.error().message()}")
        return to_numpy(pb.get_output_tensor_by_name(response, self.output_name))


class UpscaleModel:
    """RGB uint8 image [H, W, 3] + seed -> the x4 image, the sampler here and the transformer in the segment models."""

    def initialize(self, args: dict[str, Any]) -> None:
        import torch

        from ..engines.runtime import load_exported_pipeline

        self.pb_utils = _pb_utils()
        config = json.loads(args["model_config"])
        params = _parameters(config)
        threads = int(params.get(layout.PARAM_TORCH_THREADS) or 0)
        if threads:
            torch.set_num_threads(threads)
        folder = Path(args["model_repository"]) / args["model_version"] / layout.EXPORT_SUBDIR
        manifest = layout.load_serving_manifest(folder)
        backend = TritonSegmentBackend(manifest, params[layout.PARAM_SEGMENT_MODELS].split(","), self.pb_utils)
        self.pipeline = load_exported_pipeline(folder, manifest=manifest, backend=backend)

    def upscale(self, image: np.ndarray, seed: np.ndarray) -> np.ndarray:
        if seed.size != 1:
            raise ValueError(f"seed must hold one integer, got shape {list(seed.shape)}")
        return self.pipeline.upscale(image, seed=int(seed.reshape(-1)[0]))

    def execute(self, requests: list) -> list:
        pb = self.pb_utils
        responses = []
        for request in requests:
            try:
                image = to_numpy(pb.get_input_tensor_by_name(request, layout.IMAGE_INPUT))
                seed = to_numpy(pb.get_input_tensor_by_name(request, layout.SEED_INPUT))
                responses.append(pb.InferenceResponse([to_backend_tensor(pb, layout.IMAGE_OUTPUT,
                                                                         self.upscale(image, seed))]))
            except Exception as e:  # noqa: BLE001  (a bad request gets an error response; the model keeps serving)
                responses.append(error_response(pb, e))
        return responses

    def finalize(self) -> None:
        self.pipeline = None
