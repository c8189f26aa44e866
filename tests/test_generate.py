"""The command line: streaming on the default model, token-id prompts for tokenizer-free
models, and every bad input as one `error:` line in the words of the flags."""

import io
import json
import subprocess
import sys

import pytest

import nanoflow_jax
from nanoflow_jax import generate

TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 256, "eos_token_id": 255}


def _main(argv, monkeypatch, stdin_text=None):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    if stdin_text is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin_text))
    code = generate.main(argv)
    return code, out.getvalue()


def _assert_one_error_line(argv, message, monkeypatch, capsys):
    code, out = _main(argv, monkeypatch)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error", "warning"))]
    assert code == generate.EXIT_BAD_INPUT and out == ""
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.fixture
def tiny_folder(tmp_path):
    """A Hugging Face folder with a config and no tokenizer (weights: --weights random)."""
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return tmp_path


@pytest.mark.parametrize("argv, message", [
    (["Hi", "--temperature", "-1"], "--temperature=-1.0 is invalid"),
    (["Hi", "--top-p", "1.5"], "--top-p=1.5 is invalid"),
    (["Hi", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["Hi", "--max-num-seqs", "0"], "--max-num-seqs must be a positive integer"),
    (["Hi", "--num-kv-pages", "1"], "--num-kv-pages must be >= 2"),
    (["Hi", "--kv-offload-disk-path", "/tmp/x"], "--kv-offload-disk-path needs --kv-offload-disk-gb > 0"),
    (["Hi", "--kv-offload-pages-per-step", "-1"], "--kv-offload-pages-per-step must be an integer >= 0"),
    (["   "], "the prompt is empty"),
    (["Hi", "--prompt-file", "x.txt"], "either a PROMPT argument or --prompt-file"),
    (["Hi", "--prompt", "Hello"], "give the prompt once"),
    (["Hi", "--prompt-ids", "1,2"], "text prompts or --prompt-ids, not both"),
    (["--prompt-ids", "1,x"], "use comma-separated integers"),
    (["Hi", "--model", "llama-3-8b", "--weights", "random"], "--prompt-ids 1,2,3"),
    (["--model", "llama-3-8b", "--weights", "random", "--prompt-ids", "1,999999"], "outside llama-3-8b's vocabulary"),
    (["--model", "llama-3-8b", "--weights", "random", "--prompt-ids", "1", "--max-model-len", "99999"],
     "--max-model-len=99999 exceeds"),
])
def test_bad_input_is_one_clear_line_before_loading(argv, message, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the input was checked")

    monkeypatch.setattr(nanoflow_jax, "LLM", no_loading, raising=False)
    _assert_one_error_line(argv, message, monkeypatch, capsys)


@pytest.mark.parametrize("argv, message", [
    (["Hi", "--model", "/no/such/model.gguf"], "not found"),
    (["Hi", "--model", "llama-3-8b"], "--weights random"),
])
def test_model_the_loader_refuses_is_one_clear_line(argv, message, monkeypatch, capsys):
    _assert_one_error_line(argv, message, monkeypatch, capsys)


def test_broken_model_files_are_one_clear_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\xff" * 20)
    _assert_one_error_line(["Hi", "--model", str(tmp_path / "bad.gguf")], "bad.gguf", monkeypatch, capsys)
    (tmp_path / "empty").mkdir()
    _assert_one_error_line(["Hi", "--model", str(tmp_path / "empty")], "neither a Hugging Face folder",
                           monkeypatch, capsys)


def test_folder_without_tokenizer_needs_token_ids(tiny_folder, monkeypatch, capsys):
    code, _ = _main(["Hi", "--model", str(tiny_folder), "--weights", "random"], monkeypatch)
    assert code == generate.EXIT_BAD_INPUT and "--prompt-ids" in capsys.readouterr().err


@pytest.mark.parametrize("offload", [[], ["--kv-offload-host-gb", "0.01", "--kv-offload-pages-per-step", "2"]],
                         ids=["plain", "kv_offload"])
def test_random_weights_reply_in_token_ids(tiny_folder, monkeypatch, capsys, offload):
    code, out = _main(["--model", str(tiny_folder), "--weights", "random", "--prompt-ids", "1,2,3",
                       "--prompt-ids", "4", "--max-tokens", "5", "--num-kv-pages", "16", *offload], monkeypatch)
    replies = out.strip().split("\n\n")
    assert code == 0 and len(replies) == 2, out
    for reply in replies:
        ids = [int(t) for t in reply.split()]
        assert 1 <= len(ids) <= 5 and all(0 <= t < TINY_CONFIG["vocab_size"] for t in ids)
    assert "\r" not in capsys.readouterr().err  # no redrawn bars when stderr is not a terminal


def test_streams_the_known_answer(default_gguf_path, monkeypatch, capsys):
    code, out = _main(["What is the capital of France?", "--model", str(default_gguf_path), "--max-tokens", "24",
                       "--max-model-len", "128"], monkeypatch)
    err = capsys.readouterr().err
    assert code == 0 and "Paris" in out
    # Not a terminal: plain progress lines, no carriage returns, warnings in flag terms.
    assert "\r" not in err and "ready in" in err
    assert "num_kv_pages" not in err and "--num-kv-pages" in err


def test_prompt_longer_than_context_fails_that_prompt_once(default_gguf_path, monkeypatch, capsys):
    code, out = _main(["-", "--model", str(default_gguf_path), "--max-tokens", "4", "--max-model-len", "64",
                       "--no-chat-template"], monkeypatch, stdin_text="word " * 100 + "\nThe capital of France is\n")
    err = capsys.readouterr().err
    assert code == generate.EXIT_REQUEST_FAILED
    assert err.count("--max-model-len=64") == 1, err  # one error line, no log warning repeating it
    assert "error: prompt 1: the prompt has" in err and "request 'gen" not in err
    assert out.strip()  # the second prompt still completed


def test_library_names_become_flags():
    flags = generate._flag_names(generate.build_parser())
    assert generate.to_cli_terms("SamplingParams.top_p=2 is invalid", flags) == "--top-p=2 is invalid"
    assert (generate.to_cli_terms("raise num_kv_pages / kv_memory_fraction or max_model_len", flags)
            == "raise --num-kv-pages / --kv-memory-fraction or --max-model-len")
    # Plain words stay words; unknown fields and paths are left alone.
    assert generate.to_cli_terms("a seed and a temperature", flags) == "a seed and a temperature"
    assert generate.to_cli_terms("/tmp/max_model_len.gguf: SamplingParams.stop", flags) == \
        "/tmp/max_model_len.gguf: SamplingParams.stop"


def test_prompt_flag_is_the_prompt_and_never_a_prompt_file(tmp_path):
    parser = generate.build_parser()
    args = parser.parse_args(["--prompt", "Write a haiku about GPUs."])
    assert generate.read_prompts(args, io.StringIO()) == ["Write a haiku about GPUs."]
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    args = parser.parse_args(["--prompt-file", str(tmp_path / "p.txt")])
    assert generate.read_prompts(args, io.StringIO()) == ["one", "two"]
    args = parser.parse_args(["--prompt-ids", "1, 2,3", "--prompt-ids", "7"])
    assert generate.read_prompts(args, io.StringIO()) == [[1, 2, 3], [7]]
    with pytest.raises(SystemExit):  # abbreviations are off: --prompt-f is not --prompt-file
        parser.parse_args(["--prompt-f", str(tmp_path / "p.txt")])


def test_help_names_the_program_as_started(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/nanoflow-generate"])
    assert generate.build_parser().prog == "nanoflow-generate"
    monkeypatch.setattr(sys, "argv", ["/src/nanoflow_jax/generate.py"])
    assert generate.build_parser().prog == generate.MODULE_PROG
    with pytest.raises(SystemExit):
        generate.main(["--help"], prog="nanoflow-generate")
    help_text = capsys.readouterr().out
    assert "usage: nanoflow-generate" in help_text and "nanoflow-generate --prompt-file" in help_text
    assert "python -m" not in help_text


def test_module_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "nanoflow_jax.generate", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--max-tokens" in res.stdout and "--num-kv-pages" in res.stdout
    assert "usage: python -m nanoflow_jax.generate" in res.stdout
    assert "temperature 1.0, max_tokens 16" in res.stdout  # says why the library's defaults differ
