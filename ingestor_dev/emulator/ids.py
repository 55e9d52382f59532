"""Stripe-looking object ids, reproducible under a seed."""

from __future__ import annotations

import random
import string

_ALPHABET = string.ascii_letters + string.digits


class IdFactory:
    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed ^ 0x5EED)  # noqa: S311 - ids only need to be unique-looking

    def new(self, prefix: str, length: int = 24) -> str:
        return prefix + "".join(self._rng.choices(_ALPHABET, k=length))
