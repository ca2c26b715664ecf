"""The versioned price table: what a model call costs, per provider and model.

Prices are USD per million tokens for input, cached input and output. A table is
immutable once published: a price change is a new version, and every ``usage.recorded``
names the version its cost was computed with, so old spend is never re-priced.

The built-in table is ``DEFAULT_VERSION``; ``MESH_PRICE_TABLE_FILE`` (``AgentSettings.price_table_file``)
points at a JSON file of the same shape (``{"version": ..., "prices": {"provider/model": {...}}}``)
to replace it.
A call to a model the table does not price is refused before it is made: an unpriced call
would be a call no ceiling can bound.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from mesh_agent.errors import AgentError


@dataclass(frozen=True)
class Price:
    input_per_mtok: float
    output_per_mtok: float
    cached_input_per_mtok: float | None = None
    """Defaults to the input price when the provider has no prompt-cache discount."""

    def cost(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> float:
        cached = min(cached_input_tokens, input_tokens)
        cached_rate = self.input_per_mtok if self.cached_input_per_mtok is None else self.cached_input_per_mtok
        usd = (
            (input_tokens - cached) * self.input_per_mtok + cached * cached_rate + output_tokens * self.output_per_mtok
        ) / 1_000_000
        return round(usd, 10)

    def worst_case(self, prompt_tokens: int, max_tokens: int) -> float:
        """Upper bound of a call's cost: no cache discount, every allowed output token used.
        Rounded up so a reservation never under-covers the settled cost."""
        usd = (prompt_tokens * self.input_per_mtok + max_tokens * self.output_per_mtok) / 1_000_000
        return math.ceil(usd * 1e10) / 1e10


@dataclass(frozen=True)
class PriceTable:
    version: str
    prices: dict[str, Price]

    def price(self, provider: str, model: str) -> Price:
        found = self.prices.get(f"{provider}/{model}") or self.prices.get(f"{provider}/*")
        if found is None:
            raise UnpricedModel(
                f"no price for {provider}/{model} in price table {self.version}; add it "
                "(MESH_PRICE_TABLE_FILE) before calling this model"
            )
        return found


class UnpricedModel(LookupError, AgentError):
    """The price table has no entry for a model; the call is refused."""


DEFAULT_VERSION = "2026-11-28"  # 2026-11-22 plus gemma-3-270m, the second local model (free, on this CPU)
# The scripted model is priced like a small hosted model so that cost ceilings are exercised
# in tests and demos; its "dollars" are notional. Provider list prices change: review them,
# and publish a new version rather than editing one in place.
_DEFAULT = {
    "scripted/scripted-1": Price(1.00, 4.00, 0.10),
    "scripted/scripted-judge": Price(0.50, 2.00, 0.05),
    "openai/gpt-4o-mini": Price(0.15, 0.60, 0.075),
    "openai/gpt-4o": Price(2.50, 10.00, 1.25),
    "openai/gpt-4o-mini-2024-07-18": Price(0.15, 0.60, 0.075),
    "openai/gpt-4o-2024-08-06": Price(2.50, 10.00, 1.25),
    "anthropic/claude-haiku-4-5-20251001": Price(1.00, 5.00, 0.10),
    "anthropic/claude-sonnet-4-5-20250929": Price(3.00, 15.00, 0.30),
    "anthropic/claude-3-5-haiku-20241022": Price(0.80, 4.00, 0.08),
    "anthropic/claude-sonnet-4-20250514": Price(3.00, 15.00, 0.30),
    "local/*": Price(0.0, 0.0, 0.0),
    "openai/SmolLM2-135M-Instruct.Q4_1.gguf": Price(0.0, 0.0, 0.0),  # `make demo-local`, on this CPU
    "openai/gemma-3-270m-q4_k_m.gguf": Price(0.0, 0.0, 0.0),  # LOCAL_MODEL=gemma3-270m
}


def _from_json(data: dict[str, Any]) -> PriceTable:
    try:
        return PriceTable(
            str(data["version"]),
            {
                name: Price(float(p["input_per_mtok"]), float(p["output_per_mtok"]), p.get("cached_input_per_mtok"))
                for name, p in data["prices"].items()
            },
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"price table: expected {{'version', 'prices': {{'provider/model': {{...}}}}}}: {exc}"
        ) from None


@lru_cache(maxsize=4)
def current(file: str | Path | None = None) -> PriceTable:
    """The table in force: the one in ``file`` (a service's ``MESH_PRICE_TABLE_FILE``), else the
    built-in one. Raises OSError or ValueError for a file that cannot be used."""
    if file:
        return _from_json(json.loads(Path(file).read_text()))
    return PriceTable(DEFAULT_VERSION, dict(_DEFAULT))
