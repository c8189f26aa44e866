"""One process of the 2-process loopback test (test_distributed.py starts two of these).

Joins the run through `distributed.initialize()` (the NANOFLOW_* variables), checks the
process and device counts, all-reduces each device's index over a mesh spanning both
processes, then serves the tiny model split over all devices. Prints one JSON line of
what it saw.
"""

from __future__ import annotations

import json

from nanoflow_jax.parallel import distributed

# Byte-token prompts, one of them long enough to be chunked (the budget is 32 tokens).
PROMPTS = [[17, 203, 5, 88, 140], [(7 * i + 3) % 256 for i in range(40)], [1, 2, 3]]
MAX_TOKENS = 5


def main() -> None:
    joined = distributed.initialize()   # before anything touches a device
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from nanoflow_jax.parallel.mesh import TP_AXIS, make_mesh
    from tests.parallel.host_devices.conftest import greedy_tokens

    n = jax.device_count()
    mesh = make_mesh(n)
    index = jax.make_array_from_callback((n,), NamedSharding(mesh, P(TP_AXIS)),
                                         lambda idx: np.arange(n, dtype=np.float32)[idx])
    total = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, TP_AXIS), mesh=mesh, in_specs=P(TP_AXIS),
                                  out_specs=P()))(index)
    split, runner = greedy_tokens(n, PROMPTS, MAX_TOKENS)
    print(json.dumps(dict(joined=joined, process=jax.process_index(), processes=jax.process_count(),
                          devices=n, local_devices=jax.local_device_count(), psum=float(np.asarray(total)[0]),
                          cache_devices=len(runner.cache.k.sharding.device_set), split=split)),
          flush=True)


if __name__ == "__main__":
    main()
