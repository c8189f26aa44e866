"""Both interpreters fill fresh outputs with NaN, so any unwritten element fails a test.

The kernel tests rely on this instead of pre-filling outputs (which a kernel without
aliasing could not see): here a kernel that writes only half its output proves it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels._common import mosaic_interpret_params


def test_triton_interpreter_poisons_unwritten_output():
    def half(x_ref, o_ref):
        o_ref[pl.ds(0, 8), :] = x_ref[pl.ds(0, 8), :]

    out = pl.pallas_call(half, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32),
                         interpret=True)(jnp.ones((16, 16)))
    out = np.asarray(out)
    assert (out[:8] == 1).all() and np.isnan(out[8:]).all()


def test_mosaic_interpreter_poisons_unwritten_output():
    def half(x_ref, o_ref):
        o_ref[0:8, :] = x_ref[0:8, :]

    call = plgpu.kernel(half, out_type=jax.ShapeDtypeStruct((16, 128), jnp.float32),
                        interpret=mosaic_interpret_params())
    out = np.asarray(call(jnp.ones((16, 128))))
    assert (out[:8] == 1).all() and np.isnan(out[8:]).all()
