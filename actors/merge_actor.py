"""The ``MergeActor``: keeps the main branch. A thin wrapper over ``sim.store.MainState``.

Loop per commit (``MainState.receive``): validate → log durably → merge into every strategy's branch → record.
Here only: resolving the commit reference (a failed contribution becomes a rejected commit with its reason),
scheduling evaluations every ``runtime.eval_every`` accepted commits as Ray tasks, and the final evaluation.
Restarted by Ray (``max_restarts``), it rebuilds its state from the run dir's log; commits are idempotent by id.
"""
from __future__ import annotations

import time
from pathlib import Path

import ray

from actors.tasks import _config, evaluate_task, individual_task


def _resolve(wrapped: list):
    """``[ref]`` → the ``Commit`` (a ref may itself resolve to ``[ref]``, from an ``Institution`` actor)."""
    obj = ray.get(wrapped[0])
    while isinstance(obj, list) and len(obj) == 1 and isinstance(obj[0], ray.ObjectRef):
        obj = ray.get(obj[0])
    return obj


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class MergeActor:
    def __init__(self, run_dir: str, cfg_blob: str, institutions: dict, task_options: dict) -> None:
        import torch

        from sim.model import load_foundation
        from sim.store import MainState

        cfg = _config(cfg_blob)
        torch.set_num_threads(cfg.runtime.threads)
        self.cfg, self.cfg_blob, self.options = cfg, cfg_blob, task_options
        self.run_dir = Path(run_dir)
        foundation = load_foundation(cfg.model, cfg.data.img_size, cfg.runtime.device)
        if (self.run_dir / "log.jsonl").exists():
            self.state = MainState.restore(run_dir, cfg, institutions, foundation)
        else:
            self.state = MainState(run_dir, cfg, institutions, foundation)
        self.started = time.time()

    def ping(self) -> int:
        return self.state.version

    def commit(self, wrapped: list) -> dict:
        """Receive one commit (``[ref]``); returns its acknowledgement, after it is durably logged."""
        t0 = time.perf_counter()
        try:
            commit = _resolve(wrapped)
        except Exception as exc:   # the contribution itself failed (worker error, killed institution)
            reason = f"contribution failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            record = {"event": "rejected", "reason": reason, "t_wall": time.time()}
            self.state.log.append_rejected(record)
            return record
        ack = self.state.receive(commit)
        ack["task_s"] = commit.meta.get("task_s", 0.0) if hasattr(commit, "meta") else 0.0
        ack["ack_s"] = time.perf_counter() - t0
        every = self.cfg.runtime.eval_every
        if ack.get("event") == "accepted" and not ack.get("duplicate") and every and self.state.version % every == 0:
            ack["eval_ref"] = self._evaluate()
        return ack

    def pull(self, strategy: str) -> tuple:
        """``(version, adapter)`` of ``strategy``'s branch now (``None`` adapter before the first commit)."""
        return self.state.pull(strategy)

    def _evaluate(self) -> list[ray.ObjectRef]:
        """One evaluation task per strategy × task, so they spread over the pool (a mixture of N adapters costs N
        forward passes per image and would otherwise hold one worker while the others idle)."""
        version, snapshot = self.state.snapshot()
        refs = {s: ray.put({s: p}) for s, p in snapshot.items()}
        return [evaluate_task.options(**self.options).remote(self.cfg_blob, refs[s], [task], version)
                for s in snapshot for task in self.state.tasks_seen()]

    def finish(self, references: bool = True) -> dict:
        """Final evaluation (every strategy, plus ``base`` and ``individual``) and the main branch written to disk.

        Returns refs to the evaluation records (``final_ref``: one per strategy) and the per-strategy storage
        bytes.
        """
        from sim.store import save_main

        version, snapshot = self.state.snapshot()
        save_main(snapshot, self.run_dir / "main")
        tasks = self.state.tasks_seen()
        out = {"version": version, "final_ref": self._evaluate(),
               "storage": {s: (p.num_bytes() if p is not None else 0) for s, p in snapshot.items()}}
        if references:
            out["base_ref"] = evaluate_task.options(**self.options).remote(self.cfg_blob, {"base": None}, tasks,
                                                                          version)
            out["individual_ref"] = individual_task.options(**self.options).remote(
                self.cfg_blob, self.state.latest_adapters())
        return out

    def records(self) -> list[dict]:
        return self.state.records()

    @ray.method(max_task_retries=0)   # not retried after the restart it causes
    def die(self) -> None:
        """Fault injection / tests: kill this process (Ray restarts it, and it rebuilds from the log)."""
        import os

        os._exit(1)
