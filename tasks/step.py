"""`@step`: declare a plain function's Prefect task without importing Prefect.

Importing Prefect costs over a second. The up-to-date check of a re-run must
answer in well under three, and it imports the same step modules, so each
step's task object is built on first use instead of at import. Tests call the
plain functions; flows call `<function>.task`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")
CacheKeyFn = Callable[[Any, dict[str, Any]], str]


class Step(Generic[P, R]):
    """A plain function plus the Prefect task that runs it, built lazily."""

    def __init__(self, fn: Callable[P, R], options: dict[str, Any], cache_key: CacheKeyFn | None = None):
        self.fn = fn
        self.options = options
        self.cache_key = cache_key
        self._task: Any = None
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__
        self.__wrapped__ = fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    @property
    def task(self) -> Any:
        if self._task is None:
            from prefect import task

            options = dict(self.options)
            if self.cache_key is not None:
                # The default policy also keys on the run id, so nothing would be shared across runs;
                # the step's own source in the key drops results of an older version of the step.
                from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy

                options.update(cache_policy=CacheKeyFnPolicy(cache_key_fn=self.cache_key) + TASK_SOURCE,
                               persist_result=True)
            self._task = task(self.fn, **options)
        return self._task


def step(*, cache_key: CacheKeyFn | None = None, **options: Any) -> Callable[[Callable[P, R]], Step[P, R]]:
    """Mark a function as a DAG step; `options` go to `prefect.task` (name, retries, tags, ...).

    `cache_key(context, parameters)` makes the task's result shared across runs under that key
    (persisted), together with the step's own source.
    """

    def wrap(fn: Callable[P, R]) -> Step[P, R]:
        return Step(fn, options, cache_key)

    return wrap
