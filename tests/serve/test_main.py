"""The command line: the engine's flags are generate's own, server flags are checked before loading."""

from __future__ import annotations

import argparse

import pytest

from nanoflow_jax import generate
from nanoflow_jax.serve.__main__ import build_parser, check_args, main, served_name


def _options(add) -> set[str]:
    p = argparse.ArgumentParser()
    add(p)
    return {o for a in p._actions for o in a.option_strings} - {"-h", "--help"}


def test_takes_generates_model_and_engine_flags():
    serve_opts = {o for a in build_parser()._actions for o in a.option_strings}
    shared = _options(generate.add_model_args) | _options(generate.add_engine_args)
    assert shared <= serve_opts and shared <= {o for a in generate.build_parser()._actions for o in a.option_strings}
    args = build_parser().parse_args(["--max-num-seqs", "8", "--num-kv-pages", "64", "--port", "9000"])
    assert generate.engine_args(args) == {"max_num_seqs": 8, "num_kv_pages": 64, "pipeline": "auto"}


@pytest.mark.parametrize("flags, message", [
    (["--port", "70000"], "--port 70000"), (["--max-waiting-requests", "0"], "--max-waiting-requests 0"),
    (["--request-timeout", "-1"], "--request-timeout"), (["--stream-interval", "0"], "--stream-interval 0"), (["--max-num-seqs", "0"], "max_num_seqs"),
])
def test_bad_flags_fail_before_loading(flags, message, capsys):
    with pytest.raises(ValueError, match=message):
        check_args(build_parser().parse_args(flags))
    assert main(flags) == 2 and message in capsys.readouterr().err


def test_served_model_name():
    parse = build_parser().parse_args
    assert served_name(parse([])) == "SmolLM2-135M-Instruct"
    assert served_name(parse(["--model", "/m/Llama.Q8_0.gguf"])) == "Llama.Q8_0"
    assert served_name(parse(["--model", "llama-3-8b", "--served-model-name", "x"])) == "x"
