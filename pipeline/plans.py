"""One plan per stage per invocation.

Planning a stage resolves what it reads; the shard stage's plan lists and reads the corpus
(globs, file sizes, Parquet schemas), which on a network filesystem with thousands of files
takes minutes. Every later stage's plan needs its upstreams' plans, so without a cache one
``sip run`` would resolve the corpus once per stage that reads the pairs table, and again for
each dry-run line and fit check.

Inside :func:`planning_once` (``sip`` opens it around each command), :func:`planned` keeps each
stage's plan for the manifest it was made from (by content and source path), so it is made
once. Outside it nothing is kept: a library caller, or a long-lived process whose corpus
changes between runs, always plans afresh.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

_PLANS: ContextVar[dict | None] = ContextVar("sip_plans", default=None)


@contextmanager
def planning_once() -> Iterator[None]:
    """Within the block each stage is planned once per manifest (see the module docstring)."""
    token = _PLANS.set({})
    try:
        yield
    finally:
        _PLANS.reset(token)


def planned(stage: str, manifest, make: Callable[[], T]) -> T:
    """``make()``, or the plan it made earlier in this :func:`planning_once` block for an equal
    manifest (same settings, same source file)."""
    plans = _PLANS.get()
    if plans is None:
        return make()
    key = (stage, str(manifest.source), json.dumps(manifest.model_dump(mode="json"), sort_keys=True, default=str))
    if key not in plans:
        plans[key] = make()
    return plans[key]
