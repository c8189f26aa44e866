"""Bad tensor-parallel sizes give one clear error naming the problem and the fix (one CPU device here)."""

from __future__ import annotations

import dataclasses
import io
import sys

import pytest

from nanoflow_jax import generate
from nanoflow_jax.config import ModelConfig
from nanoflow_jax.engine.config import EngineConfig
from nanoflow_jax.parallel.mesh import check_devices, check_model, make_mesh
from tests.engine.conftest import TINY, make_llm

SMOLLM2 = ModelConfig.from_name("smollm2-135m")


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2", None])
def test_size_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        EngineConfig(tensor_parallel_size=bad)


@pytest.mark.parametrize("size, message", [
    (2, "tensor_parallel_size=2 must divide num_attention_heads=9; use 1 or 3"),
    (4, "tensor_parallel_size=4 must divide num_attention_heads=9; use 1 or 3"),
    (9, "tensor_parallel_size=9 must divide intermediate_size=1536; use 1 or 3"),
])
def test_size_must_split_the_default_model(size, message):
    with pytest.raises(ValueError, match=message):
        check_model(size, SMOLLM2)


def test_sizes_that_split_the_model_pass():
    for size in (1, 3):
        check_model(size, SMOLLM2)
    check_model(4, TINY)   # 4 query heads, 2 KV heads each kept on a group of 2 devices
    with pytest.raises(ValueError, match="must divide intermediate_size=129; use 1$"):
        check_model(2, dataclasses.replace(TINY, intermediate_size=129))
    twelve = dataclasses.replace(TINY, num_heads=12, num_kv_heads=4, intermediate_size=144)
    with pytest.raises(ValueError, match="=3 and num_key_value_heads=4: one must divide the other.*; use 1, 2, 4 or 12"):
        check_model(3, twelve)


def test_more_devices_than_present_names_the_cpu_flag():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 needs 2 devices, but only 1 cpu device is present "
                                         r"\(on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=2"):
        make_mesh(2)
    check_devices(1)


def test_llm_refuses_bad_sizes_before_building_the_engine():
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide num_attention_heads=4; use 1, 2 or 4"):
        make_llm(tensor_parallel_size=3)
    with pytest.raises(ValueError, match="needs 2 devices, but only 1"):
        make_llm(tensor_parallel_size=2)


@pytest.mark.parametrize("value, message", [
    ("0", "--tensor-parallel-size must be a positive integer"),
    ("2", "--tensor-parallel-size=2 needs 2 devices, but only 1 cpu device is present"),
])
def test_cli_names_the_flag(value, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    code = generate.main(["--model", "smollm2-135m", "--weights", "random", "--prompt-ids", "1,2",
                          "--tensor-parallel-size", value])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == generate.EXIT_BAD_INPUT and len(err) == 1 and message in err[0], err
