"""An OpenAI-compatible HTTP server over the engine (`python -m nanoflow_jax.serve`).

Needs the `serve` extra (FastAPI, uvicorn, prometheus-client, pydantic). Modules:
`protocol` (request models, responses), `engine_thread` (the thread that drives the
engine), `engine_process` (the engine in a child process) and `wire` (updates as deltas
between the two), `metrics` (Prometheus), `app` (the FastAPI app), `__main__` (the command line).
"""
