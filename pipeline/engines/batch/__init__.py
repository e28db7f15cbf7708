"""The batch engine: the same run through the provider's Batch API, at its batch price.

Owns: turning the rows to do into batch files, submitting them, waiting for them and putting
their answers in the store through the driver, every step recorded in the ledger so that the
same command after a kill re-attaches to what the provider already holds; `annotate batch
status` and `cancel`. Never: another engine, the online limits (a batch has the provider's own
pool).

Entry points: `run` (the engine, for the runner), `status`, `cancel` and `last_run_config`
(for the CLI).
"""

from __future__ import annotations

import logging

from ...client import read_key
from ...config import EndpointConfig
from ...errors import RequestFailed, RunStopped
from ...structured import OutputSchema
from ..driver import Driver, stopping_on_signals
from .api import BatchApi
from .engine import BatchRun
from .commands import cancel, last_run_config, status

__all__ = ["cancel", "last_run_config", "run", "status"]

log = logging.getLogger(__name__)


async def run(driver: Driver, endpoints: list[EndpointConfig], schema: OutputSchema | None,
              limit: int | None) -> None:
    (endpoint,) = endpoints  # the config check allows one endpoint with engine: batch
    api = BatchApi(endpoint, read_key(endpoint), driver.cfg.limits.max_attempts)
    try:
        with stopping_on_signals(driver, grace_s=0):  # nothing is in flight here: the batches run on
            await BatchRun(driver, api, driver.ledger(), schema).run(limit, driver.cfg.batch.wait)
    except RequestFailed as exc:  # retried as online requests are, and still failing
        raise RunStopped(f"the Batch API at {endpoint.base_url}: {exc}; run the same command again to go on "
                         "from here") from None
    finally:
        await api.aclose()
        if driver.signalled:
            log.warning("the batches keep running at the provider: `annotate batch status %s` lists them, and the "
                        "same `annotate run` collects them", driver.cfg.output.dir)
