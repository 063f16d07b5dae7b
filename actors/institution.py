"""The ``Institution`` actor: a host of one or more hospitals. Light on purpose (no torch in its process).

Each hosted institution keeps its own private splits (put into the object store by the actor itself, so the data
are owned by this process) and its own signing key (derived from the run's secret, handed over at start); the actor
hands each contribution to a pooled torch worker (``actors.tasks.contribute_task``) with the data and key of the
institution it is for. What leaves is a reference to the resulting signed ``Commit`` — adapter, distilled set,
local numbers — never the images. ``runtime.institutions_per_actor`` sets how many one actor hosts (Flower's virtual
clients on a few actors): nothing an institution computes depends on which actor hosts it, so the results are the
same either way, and a community of hundreds needs a few processes instead of hundreds.

Ray restarts it when it dies (``max_restarts``); calls in flight are retried. A commit it had made is lost with it
(its owner): the merge actor then calls ``contribute`` again, which makes the identical commit (same seed). A killed
actor takes every institution it hosts down with it until Ray restarts it.
When to contribute is the driver's decision (``actors.drivers``, either clock); this actor only forwards, and
``contribute`` returns at once, so one call at a time is enough.
"""
from __future__ import annotations

import ray

from actors.tasks import _config, contribute_task


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class Institution:
    def __init__(self, insts: list, cfg_blob: str, task_options: dict, keys: dict | None = None) -> None:
        """``insts``: the hosted institutions' ``sim.data.Institution``, or object refs to them (Ray resolves only a
        top-level argument, so refs in the list are fetched here); ``keys``: institution id -> signing key."""
        insts = [ray.get(x) if isinstance(x, ray.ObjectRef) else x for x in insts]
        self.ids = tuple(inst.id for inst in insts)
        self._data = {inst.id: ray.put(inst) for inst in insts}     # private data, owned by this actor
        self._cfg_blob = cfg_blob
        self._options = task_options
        self._keys = dict(keys or {})

    def ping(self) -> tuple[int, ...]:
        return self.ids

    def contribute(self, contribution, pulled: list | None = None) -> list:
        """Start one contribution; returns ``[ref]`` to its ``Commit`` (wrapped so this process never loads it), and
        with ``faults.corrupt`` drawn for it ``[ref, ref to a corrupted copy]``.

        ``pulled``: ``[ref]`` to the merge actor's ``pull`` result (init_from: main), resolved by the worker.
        """
        from sim.faults import corrupt_kind

        i = contribution.institution
        if i not in self._data:
            raise ValueError(f"contribution {contribution.id} is not for an institution this actor hosts "
                             f"({', '.join(map(str, self.ids))})")
        pull_ref = pulled[0] if pulled else None
        ref, corrupted = contribute_task.options(**self._options).remote(self._cfg_blob, self._data[i], contribution,
                                                                         pull_ref, self._keys.get(i))
        cfg = _config(self._cfg_blob)
        return [ref] if corrupt_kind(cfg.faults, cfg.seed, contribution.id) is None else [ref, corrupted]
