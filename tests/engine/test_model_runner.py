"""engine.model_runner: what its compiled steps may and may not hold."""


def test_no_compiled_step_branches_on_device_data():
    """A `lax.cond` on a GPU copies its predicate to the host and blocks the dispatch until
    the device gets there: neither the forward buckets nor the start-up samplers may hold one."""
    from tests.engine.conftest import make_llm

    runner = make_llm(precompile=True).engine.runner
    executables = [*runner._compiled.values(), *runner._samplers.values()]
    assert len(runner._samplers) >= 2 and len(executables) == len(runner.compile_jobs())
    for exe in executables:
        assert " conditional(" not in exe.as_text()
