"""The output directory: the Parquet dataset, the journal, the lock and `_run.json`.

Owns: `columns` (the output schema), `journal` (outcomes durable before they are parts),
`parts` (the `Store`: done ids, parts written whole, `scan`), `lock`, `compact`.
Never: requests or replies; only the driver (`pipeline.engines.driver`) writes a store.
"""
