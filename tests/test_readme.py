"""The README's snippets run as written: every ```python block runs, every command in a
```bash block names a module, script, extra and flags that exist, CI runs the README's
test command, and the README documents every environment variable."""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nanoflow_jax import download, env

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
TEST_COMMAND = 'pip install -e ".[test]" && python -m pytest -q'


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def _commands() -> list[list[str]]:
    """Each simple command of the bash blocks, as argv (comments, pipes and && split off)."""
    out = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)  # quotes kept, '#' comments dropped
            argv: list[str] = []
            for token in [*lexer, "&&"]:
                if token in ("&&", "||", "|", ";"):
                    if argv:
                        out.append(argv)
                    argv = []
                else:
                    argv.append(token)
    return out


@functools.cache
def _help(module: str) -> str:
    res = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0, f"python -m {module} --help failed:\n{res.stderr[-2000:]}"
    return res.stdout


def _python_blocks() -> list[pytest.param]:
    return [pytest.param(code, id=f"python-{i}") for i, code in enumerate(_blocks("python"))]


@pytest.mark.parametrize("code", _python_blocks())
def test_python_snippet_runs(code, capsys):
    compiled = compile(code, "README.md", "exec")
    statements = "\n".join(line.split("#")[0] for line in code.splitlines())
    uses_default_model = "LLM(" in statements and "params=" not in statements and "model=" not in statements
    if uses_default_model and download.cached_default_model() is None:
        pytest.skip("the default model is not downloaded yet (the snippet compiled)")
    exec(compiled, {"__name__": "readme_snippet"})
    printed = capsys.readouterr().out
    assert printed.strip(), "a README snippet should show its result"
    if uses_default_model:
        assert "Paris" in printed


def test_bash_commands_exist():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    checked = 0
    for argv in _commands():
        while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):  # VAR=value before a command
            argv = argv[1:]
        if argv[:3] == ["python", "-m", "pytest"] or argv[:3] == ["python3", "-m", "venv"] or argv[0] in (".", "echo", "printf"):
            continue
        if argv[0] == "pip":
            for spec in argv[2:]:
                extra = re.fullmatch(r"\.\[(\w+)\]", spec)
                assert spec in ("-e", ".") or (extra and extra.group(1) in extras), f"pip {spec}: no such extra"
            continue
        if argv[0] == "bash":
            assert (ROOT / argv[1]).is_file(), f"{argv[1]} does not exist"
            continue
        assert argv[:2] == ["python", "-m"], f"README command not checked: {shlex.join(argv)}"
        text = _help(argv[2])
        for flag in (a.split("=")[0] for a in argv[3:] if a.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", text), f"python -m {argv[2]} has no {flag}"
        checked += 1
    assert checked >= 2


def test_readme_has_one_setup_generate_and_test_command():
    commands = [shlex.join(argv) for argv in _commands()]
    assert sum(c.startswith("python3 -m venv") for c in commands) == 1
    assert commands.count("pip install -e .") == 1
    assert sum(c == "python -m nanoflow_jax.generate 'What is the capital of France?'" for c in commands) == 1
    test_lines = [line for block in _blocks("bash") for line in block.splitlines() if "pytest" in line]
    assert test_lines == [TEST_COMMAND]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert TEST_COMMAND in ci.splitlines()


def test_readme_documents_every_environment_variable():
    for var in env.ALL:
        assert f"`{var.name}`" in README, f"README lacks {var.name}"
