"""NanoFlow's model-based auto-search: kernel profiles (`profile`), the interference of
overlapped kernels (`interference`), and the two-stage search over nano-batch structures and
SM shares with batch sizing from KV memory (`search`). `python -m nanoflow_jax.autosearch
--search` runs them and verifies the best candidates by measurement."""
