"""`python -m nanoflow_jax.generate`: streaming output on the default model, and bad input."""

import io
import subprocess
import sys

import pytest

from nanoflow_jax import generate


def _main(argv, monkeypatch, stdin_text=None):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    if stdin_text is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin_text))
    code = generate.main(argv)
    return code, out.getvalue()


@pytest.mark.parametrize("argv, message", [
    (["Hi", "--temperature", "-1"], "temperature=-1.0 is invalid"),
    (["Hi", "--top-p", "1.5"], "top_p"),
    (["Hi", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["   "], "the prompt is empty"),
    (["Hi", "--prompt-file", "x.txt"], "either a PROMPT argument or --prompt-file"),
    (["Hi", "--prompt", "Hello"], "give the prompt once"),
    (["Hi", "--model", "/no/such/model.gguf"], "not found"),
    (["Hi", "--model", "llama-3-8b"], "--weights random"),
])
def test_bad_input_is_one_clear_line(argv, message, monkeypatch, capsys):
    code, out = _main(argv, monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == generate.EXIT_BAD_INPUT and out == ""
    assert err[-1].startswith("error: ") and message in err[-1], err


def test_streams_the_known_answer(default_gguf_path, monkeypatch, capsys):
    code, out = _main(["What is the capital of France?", "--model", str(default_gguf_path), "--max-tokens", "24",
                       "--max-model-len", "128"], monkeypatch)
    assert code == 0 and "Paris" in out


def test_prompt_longer_than_context_fails_that_prompt(default_gguf_path, monkeypatch, capsys):
    code, out = _main(["-", "--model", str(default_gguf_path), "--max-tokens", "4", "--max-model-len", "64",
                       "--no-chat-template"], monkeypatch, stdin_text="word " * 100 + "\nThe capital of France is\n")
    err = capsys.readouterr().err
    assert code == generate.EXIT_REQUEST_FAILED
    assert "prompt 1" in err and "max_model_len" in err
    assert out.strip()  # the second prompt still completed


def test_prompt_flag_is_the_prompt_and_never_a_prompt_file(tmp_path):
    parser = generate.build_parser()
    args = parser.parse_args(["--prompt", "Write a haiku about GPUs."])
    assert generate.read_prompts(args, io.StringIO()) == ["Write a haiku about GPUs."]
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    args = parser.parse_args(["--prompt-file", str(tmp_path / "p.txt")])
    assert generate.read_prompts(args, io.StringIO()) == ["one", "two"]
    with pytest.raises(SystemExit):  # abbreviations are off: --prompt-f is not --prompt-file
        parser.parse_args(["--prompt-f", str(tmp_path / "p.txt")])


def test_module_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "nanoflow_jax.generate", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--max-tokens" in res.stdout and "--no-chat-template" in res.stdout
