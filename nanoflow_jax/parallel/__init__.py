"""Tensor parallelism over a `jax.sharding.Mesh` and multi-host start-up.

`mesh.py` checks a tensor-parallel size against the model and the devices and builds the
mesh; `sharding.py` lays the parameters and the KV page pool out over it; `forward.py`
runs the pipeline's forward on every device's shard (`shard_map`); `distributed.py` joins
the processes of a multi-host run (`jax.distributed.initialize`).
"""
