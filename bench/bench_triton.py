"""Load bench: the generated Triton model repository on a local tritonserver against the in-process Python runtime.

Both sides run the same export on the same images and seeds: the in-process side is
`load_exported_pipeline(folder)` shared by N client threads; the Triton side is `qdit4sr_upscale`
(Python backend, BLS) calling the python-form segment models (onnxruntime inside, dynamic batching),
with N client threads each holding its own gRPC (or HTTP) client. Closed loop: each client sends its
next request when the previous one returns. For 1, 4 and 8 clients it prints requests/s and the
p50/p95 latency of each side and their ratios (Triton / in-process), the segment models' mean batch
(tiles per execution) and whether every Triton image equals the in-process one.

    python bench/bench_triton.py [--engines DIR] [--requests 8] [--size 16] [--upscale-instances 4]

Without --engines it first exports the embedded tiny model (W4A4, portable graphs, 2 segments) with
`qdit4sr-export` into a temporary folder. Everything runs on this machine's CPU cores: the server,
its Python-backend processes and the clients share them, so the table says what the serving layer
costs here, not what a GPU cluster gains (see the README's "Serving at scale").
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdit4sr.engines.runtime import load_exported_pipeline  # noqa: E402
from qdit4sr.models.images import HELD_OUT_PHOTOS, load_photo  # noqa: E402
from qdit4sr.serving.local_server import LocalTritonServer  # noqa: E402
from qdit4sr.serving.triton_repo import RepositorySettings, write_model_repository  # noqa: E402

CONCURRENCY = (1, 4, 8)


def export_tiny(folder: Path) -> None:
    from qdit4sr.cli.export import export_command

    export_command.main(["--precision", "w4a4", "--out", str(folder), "--flavour", "portable", "--segments", "2",
                         "--calib-count", "4"], standalone_mode=False)


def images(count: int, size: int) -> list[tuple[np.ndarray, int]]:
    """Crops of the held-out photos at spread positions, one seed each."""
    out = []
    for i in range(count):
        photo = load_photo(HELD_OUT_PHOTOS[i % len(HELD_OUT_PHOTOS)])
        h, w = photo.shape[:2]
        top, left = (37 * i) % (h - size), (53 * i) % (w - size)
        out.append((np.ascontiguousarray(photo[top:top + size, left:left + size]), 100 + i))
    return out


def closed_loop(call, jobs: list, clients: int) -> tuple[float, list[float], list]:
    """Run jobs over `clients` threads, each sending its next job when the last returns.

    Returns (wall seconds, per-job latencies, per-job results)."""
    latencies = [0.0] * len(jobs)
    results = [None] * len(jobs)
    errors = []

    def worker(k: int) -> None:
        state = {}
        try:
            for j in range(k, len(jobs), clients):
                start = time.perf_counter()
                results[j] = call(state, *jobs[j])
                latencies[j] = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            if "client" in state:
                state["client"].close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return wall, latencies, results


def triton_call(module, url: str):
    def call(state, image, seed):
        if "client" not in state:
            state["client"] = module.InferenceServerClient(url)
        inputs = [module.InferInput("image", list(image.shape), "UINT8"), module.InferInput("seed", [1], "INT64")]
        inputs[0].set_data_from_numpy(image)
        inputs[1].set_data_from_numpy(np.array([seed], dtype=np.int64))
        return state["client"].infer("qdit4sr_upscale", inputs).as_numpy("sr_image")
    return call


def segment_batches(url: str, models: list[str]) -> tuple[int, int]:
    import tritonclient.http as http

    client = http.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics()["model_stats"]
    finally:
        client.close()
    rows = [s for s in stats if s["name"] in models]
    return sum(int(s["inference_count"]) for s in rows), sum(int(s["execution_count"]) for s in rows)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=Path, default=None, help="exported folder (default: export the tiny model)")
    parser.add_argument("--requests", type=int, default=8, help="requests per client count (at least 2 per client)")
    parser.add_argument("--size", type=int, default=16, help="LR crop side in pixels")
    parser.add_argument("--upscale-instances", type=int, default=4)
    parser.add_argument("--segment-instances", type=int, default=1)
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    args = parser.parse_args()
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    with tempfile.TemporaryDirectory(prefix="bench_triton_") as tmp:
        tmp = Path(tmp)
        engines = args.engines
        if engines is None:
            engines = tmp / "export"
            print("exporting the embedded tiny model (W4A4, portable graphs) ...", flush=True)
            export_tiny(engines)
        repo = write_model_repository(engines, tmp / "repo", RepositorySettings(
            segment_form="python", upscale_instances=args.upscale_instances,
            segment_instances=args.segment_instances))
        pipeline = load_exported_pipeline(engines)
        load = os.getloadavg()[0]
        rows = []
        identical = total = 0
        with LocalTritonServer(repo.root, tmp / "server", startup_timeout=600) as server:
            url = server.grpc_url if args.protocol == "grpc" else server.http_url
            remote = triton_call(grpc if args.protocol == "grpc" else http, url)
            local = lambda state, image, seed: pipeline.upscale(image, seed=seed)  # noqa: E731
            warm = images(2, args.size)
            closed_loop(remote, warm, 2)
            closed_loop(local, warm, 2)
            for clients in CONCURRENCY:
                jobs = images(max(args.requests, 2 * clients), args.size)
                wall_l, lat_l, res_l = closed_loop(local, jobs, clients)
                before = segment_batches(server.http_url, repo.segment_models)
                wall_t, lat_t, res_t = closed_loop(remote, jobs, clients)
                after = segment_batches(server.http_url, repo.segment_models)
                tiles, executions = after[0] - before[0], after[1] - before[1]
                identical += sum(np.array_equal(a, b) for a, b in zip(res_l, res_t))
                total += len(jobs)
                rows.append((clients, len(jobs), len(jobs) / wall_l, pct(lat_l, 50), pct(lat_l, 95),
                             len(jobs) / wall_t, pct(lat_t, 50), pct(lat_t, 95), tiles / max(executions, 1)))
                print(f"  {clients} clients done", flush=True)

    print(f"\nTriton ({args.protocol}, python-form segments, {args.upscale_instances} upscale instances) vs the "
          f"in-process Python runtime; {args.size}x{args.size} LR crops -> x4, {os.cpu_count()} CPU cores, "
          f"load average {load:.1f} at start")
    print("| clients | requests | in-process req/s | p50 s | p95 s | Triton req/s | p50 s | p95 s "
          "| req/s ratio | p50 ratio | p95 ratio | tiles per segment execution |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c, n, rl, l50, l95, rt, t50, t95, batch in rows:
        print(f"| {c} | {n} | {rl:.2f} | {l50:.2f} | {l95:.2f} | {rt:.2f} | {t50:.2f} | {t95:.2f} "
              f"| {rt / rl:.2f} | {t50 / l50:.2f} | {t95 / l95:.2f} | {batch:.1f} |")
    print(f"ratios are Triton / in-process; images identical to the in-process runtime's: {identical}/{total}")


if __name__ == "__main__":
    main()
