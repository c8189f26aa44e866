"""An OpenAI-compatible HTTP server over the engine (`python -m nanoflow_jax.serve`).

Needs the `serve` extra (FastAPI, uvicorn, prometheus-client, pydantic). Modules:
`protocol` (request models, responses), `engine_thread` (the thread that owns the
engine), `metrics` (Prometheus), `app` (the FastAPI app), `__main__` (the command line).
"""
