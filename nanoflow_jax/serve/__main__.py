"""`python -m nanoflow_jax.serve` / `nanoflow-serve`: the OpenAI-compatible HTTP server.

It takes the engine's flags (the same as `nanoflow_jax.generate`) and the server's own.
The engine runs in its own process (--no-engine-process: on a thread of this one).
SIGTERM (or Ctrl-C) drains: new requests get 503, the running ones finish or, past
--drain-timeout, are aborted; then the engine thread and process stop and the server exits 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from nanoflow_jax.generate import add_engine_args, add_model_args, engine_args

MODULE_PROG = "python -m nanoflow_jax.serve"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def build_parser(prog: str = MODULE_PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, allow_abbrev=False,
                                description="Serve a Llama-family model over OpenAI's HTTP API "
                                            "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics).")
    add_model_args(p)
    add_engine_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    s.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: the --model file's or folder's name)")
    s.add_argument("--max-waiting-requests", type=int, metavar="N", default=4096,
                   help="accepted requests that have no token yet; past it a request gets 503 with Retry-After "
                        "(default: 4096)")
    s.add_argument("--request-timeout", type=float, metavar="S", default=600.0,
                   help="seconds a request may take from arrival; past it, it is aborted and gets 504; "
                        "0 = no limit (default: 600)")
    s.add_argument("--stream-interval", type=int, metavar="N", default=1,
                   help="a stream sends a request's first token at once, then every N tokens: a larger N "
                        "spends less host time a token when hundreds of requests stream (default: 1)")
    s.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the engine in its own process, so streaming clients' HTTP work never holds up "
                        "the device (default: on; --no-engine-process runs it on a thread of this process)")
    s.add_argument("--drain-timeout", type=float, metavar="S", default=30.0,
                   help="on SIGTERM, seconds running requests get to finish before they are aborted (default: 30)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def check_args(args: argparse.Namespace) -> None:
    """Server flags a model load should not wait for to fail."""
    from nanoflow_jax.engine.config import EngineConfig

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a port: use 0-65535")
    if args.max_waiting_requests < 1:
        raise ValueError(f"--max-waiting-requests {args.max_waiting_requests}: use at least 1")
    if args.stream_interval < 1:
        raise ValueError(f"--stream-interval {args.stream_interval}: use at least 1 (tokens)")
    if args.request_timeout < 0 or args.drain_timeout < 0:
        raise ValueError("--request-timeout and --drain-timeout are seconds >= 0")
    EngineConfig(max_model_len=args.max_model_len or 2048, **engine_args(args))
    for module in ("fastapi", "uvicorn", "prometheus_client", "pydantic"):
        try:
            __import__(module)
        except ImportError:
            raise RuntimeError(f"the server needs {module}, which is not installed: "
                               "pip install -e '.[serve]' (or pip install nanoflow_jax[serve])") from None


def served_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model is None:
        return DEFAULT_MODEL_NAME
    name = Path(args.model).name
    return name.removesuffix(".gguf") or args.model


def build_app(args: argparse.Namespace) -> Any:
    from nanoflow_jax.serve.app import ServerConfig, create_app

    live = sys.stderr.isatty()
    print(f"loading {args.model or 'the default model'} ...", file=sys.stderr, flush=True)
    llm_kwargs = dict(model=args.model, weights=args.weights, dtype=args.dtype, max_model_len=args.max_model_len,
                      kernels=args.kernels, show_progress=live, **engine_args(args))
    if args.engine_process:
        from nanoflow_jax.serve.engine_process import RemoteLLM

        llm: Any = RemoteLLM(llm_kwargs)
    else:
        from nanoflow_jax import LLM

        llm = LLM(**llm_kwargs)
    config = ServerConfig(served_model_name=served_name(args),
                          model_aliases=tuple(a for a in (args.model,) if a),
                          max_waiting_requests=args.max_waiting_requests,
                          request_timeout=args.request_timeout or None,
                          stream_interval=args.stream_interval)
    return create_app(llm, config)


def serve(app: Any, args: argparse.Namespace) -> None:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.serving.drain()   # 503 for requests that still reach us
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.drain_timeout, timeout_keep_alive=5)
    # uvicorn re-raises the signal it drained on after shutting down; a no-op handler
    # makes that a clean exit (0) instead of death by SIGTERM.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    DrainingServer(config).run()


def main(argv: Sequence[str] | None = None, prog: str = MODULE_PROG) -> int:
    from nanoflow_jax import env

    env.claim_serving_memory()   # before JAX first touches the GPU
    args = build_parser(prog).parse_args(argv)
    try:
        check_args(args)
        app = build_app(args)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    serve(app, args)
    return 0


def console_main() -> int:
    return main(prog="nanoflow-serve")


if __name__ == "__main__":
    sys.exit(main())
