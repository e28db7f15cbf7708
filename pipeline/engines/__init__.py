"""Engines: how a run's rows become requests and their outcomes reach the store.

Owns: `driver` (what every engine shares: the store's one writer, progress, the summary,
signals), `local` (one asyncio loop), `ray` (a Ray cluster; the only package that imports ray).
Never: choosing the engine (`pipeline.runner.run` does); no engine imports another.
"""
