"""The meter catalog kept current: read from Stripe at start (until it is read; a key Stripe refuses stops
start-up), re-read every INGESTOR_METER_REFRESH_S, and on demand when unknown event names wait for it
(`ingestor.meter_refresh`). A failed refresh keeps the last catalog.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ingestor import catalog as catalog_mod
from ingestor.settings import SettingsError

if TYPE_CHECKING:
    from ingestor.settings import Settings
    from ingestor.stripe_http import StripeHttp

log = logging.getLogger("ingestor.catalog_refresh")

CATALOG_RETRY_S = 5.0
#: Stripe's answers to a key it does not accept: 401 (unknown, revoked) and 403 (lacks a permission).
REFUSED = frozenset({401, 403})


class CatalogKeeper:
    """The meter catalog read from Stripe: at start (until it is read, or a refused key stops start-up),
    every INGESTOR_METER_REFRESH_S, and when unknown event names ask for it (`ConsumerLoop`)."""

    def __init__(self, catalog: catalog_mod.MeterCatalog, stripe: StripeHttp, settings: Settings) -> None:
        self.catalog = catalog
        self._stripe = stripe
        self.settings = settings

    async def load(self, stop: asyncio.Event) -> None:
        s = self.settings
        if s.meter_catalog == "static":
            self.catalog.replace(catalog_mod.from_static(s.meters))
            return
        if s.meter_catalog == "off":
            return
        while not stop.is_set():
            try:
                self.catalog.replace(await self._fetch_catalog())
            except catalog_mod.CatalogError as exc:
                if exc.status in REFUSED:
                    raise key_refused("reading the meter catalog (GET /v1/billing/meters)", exc.status) from None
                log.error("cannot read the meter catalog from Stripe; retrying", extra={"error": str(exc)})  # noqa: TRY400
                await asyncio.sleep(CATALOG_RETRY_S)
            else:
                log.info("meter catalog loaded", extra={"meters": len(self.catalog)})
                return

    async def _fetch_catalog(self) -> catalog_mod.MeterCatalog:
        return await catalog_mod.fetch_from_stripe(self._stripe)

    async def run(self) -> None:
        """Re-read the catalog every INGESTOR_METER_REFRESH_S."""
        while True:
            await asyncio.sleep(self.settings.meter_refresh_s)
            await self.refresh()

    async def refresh(self) -> None:
        try:
            self.catalog.replace(await self._fetch_catalog())
        except catalog_mod.CatalogError as exc:
            log.warning("meter catalog refresh failed; keeping the last one", extra={"error": str(exc)})


def key_refused(doing: str, status: int | None) -> SettingsError:
    """The key is never shown: only what was refused and how."""
    return SettingsError(
        f"STRIPE_API_KEY/STRIPE_API_KEY_FILE: Stripe refused the key (HTTP {status}) {doing}; "
        "check that it is the account's secret key (or a restricted key with meter permissions) "
        "for the right mode and that it is not revoked"
    )
