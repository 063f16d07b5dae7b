"""The ``Institution`` actor: one hospital. Light on purpose (no torch in its process).

It owns its private splits (put into the object store by the actor itself, so the data are owned by this
process) and hands each contribution to a pooled torch worker (``actors.tasks.contribute_task``), with its signing
key (derived from the run's secret, handed over at start). What leaves is a reference to the resulting signed
``Commit`` — adapter, distilled set, local numbers — never the images.

Ray restarts it when it dies (``max_restarts``); calls in flight are retried. A commit it had made is lost with it
(its owner): the merge actor then calls ``contribute`` again, which makes the identical commit (same seed).
When to contribute is the driver's decision (``actors.drivers``, either clock); this actor only forwards, and
``contribute`` returns at once, so one call at a time is enough.
"""
from __future__ import annotations

import ray

from actors.tasks import _config, contribute_task


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class Institution:
    def __init__(self, inst, cfg_blob: str, task_options: dict, key: bytes | None = None) -> None:
        self.id, self.task = inst.id, inst.task
        self._data = ray.put(inst)           # private data, owned by this actor
        self._cfg_blob = cfg_blob
        self._options = task_options
        self._key = key

    def ping(self) -> int:
        return self.id

    def contribute(self, contribution, pulled: list | None = None) -> list:
        """Start one contribution; returns ``[ref]`` to its ``Commit`` (wrapped so this process never loads it), and
        with ``faults.corrupt`` drawn for it ``[ref, ref to a corrupted copy]``.

        ``pulled``: ``[ref]`` to the merge actor's ``pull`` result (init_from: main), resolved by the worker.
        """
        from sim.faults import corrupt_kind

        if contribution.institution != self.id:
            raise ValueError(f"contribution {contribution.id} is not for institution {self.id}")
        pull_ref = pulled[0] if pulled else None
        ref, corrupted = contribute_task.options(**self._options).remote(self._cfg_blob, self._data, contribution,
                                                                         pull_ref, self._key)
        cfg = _config(self._cfg_blob)
        return [ref] if corrupt_kind(cfg.faults, cfg.seed, contribution.id) is None else [ref, corrupted]
