"""The ``Institution`` actor: one hospital. Light on purpose (no torch in its process).

It owns its private splits (put into the object store by the actor itself, so the data are owned by this
process) and hands each contribution to a pooled torch worker (``actors.tasks.contribute_task``). What leaves is
a reference to the resulting ``Commit`` — adapter, distilled set, local numbers — never the images.
"""
from __future__ import annotations

import time

import ray

from actors.tasks import contribute_task


@ray.remote(num_cpus=0)
class Institution:
    def __init__(self, inst, cfg_blob: str, task_options: dict) -> None:
        self.id, self.task = inst.id, inst.task
        self._data = ray.put(inst)           # private data, owned by this actor
        self._cfg_blob = cfg_blob
        self._options = task_options

    def ping(self) -> int:
        return self.id

    def contribute(self, contribution, pulled: list | None = None) -> list:
        """Start one contribution; returns ``[ref]`` to its ``Commit`` (wrapped so this process never loads it).

        ``pulled``: ``[ref]`` to the merge actor's ``pull`` result (init_from: main), resolved by the worker.
        """
        if contribution.institution != self.id:
            raise ValueError(f"contribution {contribution.id} is not for institution {self.id}")
        pull_ref = pulled[0] if pulled else None
        ref = contribute_task.options(**self._options).remote(self._cfg_blob, self._data, contribution, pull_ref)
        return [ref]

    def run_wall(self, contributions: list, merge_actor, start: float, scale: float, pull_strategy: str | None
                 ) -> list[dict]:
        """Wall clock: sleep until each scaled start time, train, wait the scaled delay, commit when done.

        Merge order is the order commits reach the merge actor (real concurrency, not reproducible).
        """
        acks = []
        for c in contributions:
            time.sleep(max(0.0, start + c.t_pull * scale - time.time()))
            pulled = [merge_actor.pull.remote(pull_strategy)] if pull_strategy else None
            [ref] = self.contribute(c, pulled)
            ray.wait([ref], fetch_local=False)
            time.sleep(c.delay * scale)
            acks.append(ray.get(merge_actor.commit.remote([ref])))
        return acks
