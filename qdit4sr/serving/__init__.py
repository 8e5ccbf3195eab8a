"""Serving an export at scale: a Triton Inference Server model repository generated from manifest.json
(`triton_repo`), the Python-backend models it uses (`python_models`), and a local server for tests
and benchmarks (`local_server`)."""
