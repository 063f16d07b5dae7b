"""The ``Institution`` actor: one hospital. Light on purpose (no torch in its process).

It owns its private splits (put into the object store by the actor itself, so the data are owned by this
process) and hands each contribution to a pooled torch worker (``actors.tasks.contribute_task``), with its signing
key (derived from the run's secret, handed over at start). What leaves is a reference to the resulting signed
``Commit`` — adapter, distilled set, local numbers — never the images.

Ray restarts it when it dies (``max_restarts``); calls in flight are retried. A commit it had made is lost with it
(its owner): the merge actor then calls ``contribute`` again, which makes the identical commit (same seed).
Threaded (``max_concurrency``), so the merge actor can ask for a contribution again while ``run_wall`` waits.
"""
from __future__ import annotations

import time

import ray

from actors.tasks import _config, contribute_task


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=4)
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

    def run_wall(self, contributions: list, merge_actor, start: float, scale: float, pull_strategy: str | None,
                 skip: list | tuple = ()) -> list[dict]:
        """Wall clock: sleep until each scaled start time, train, wait the scaled delay, commit when done.

        Merge order is the order commits reach the merge actor (real concurrency, not reproducible). Contributions
        the merge actor has accepted already (this call retried after a restart, or a resumed run), or in ``skip``,
        are not made again.
        """
        me = ray.get_runtime_context().current_actor
        done = set(ray.get(merge_actor.accepted_ids.remote())) | set(skip)
        acks = []
        for c in contributions:
            if c.id in done:
                continue
            time.sleep(max(0.0, start + c.t_pull * scale - time.time()))
            pulled = [merge_actor.pull.remote(pull_strategy)] if pull_strategy else None
            refs = self.contribute(c, pulled)
            ray.wait(refs[:1], fetch_local=False)
            time.sleep(c.delay * scale)
            for index, ref in enumerate(refs):          # the genuine commit, then a corrupted copy if any
                note = {"injected": "corrupt"} if index else None
                acks.append(ray.get(merge_actor.commit.remote([ref], (me, c, pulled, index), note)))
        return acks
