"""The ``MergeActor``: keeps the main branch. A thin wrapper over ``sim.main_state.MainState``.

Loop per commit (``MainState.receive``): authenticate → validate → log durably → merge into every strategy's branch
→ record. Here only: resolving the commit reference — a contribution lost with its institution or worker is made
again by the (restarted) institution, up to ``faults.retries`` times, before it becomes a rejected commit with its
reason; one that raised is rejected at once — evaluations every ``runtime.eval_every`` accepted commits as Ray tasks,
and the final evaluation. Restarted by Ray (``max_restarts``), it rebuilds its state from the run dir's log and
submits again the evaluations its dead predecessor owned; commits are idempotent by id.
"""
from __future__ import annotations

import os
import time

import ray

from actors.tasks import _config, evaluate_task, individual_task

# A contribution's result is gone with its owner or its worker: have it made again. Anything else (the training
# raised) is the contribution's own failure.
LOST = (ray.exceptions.ObjectLostError, ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
        ray.exceptions.NodeDiedError, ray.exceptions.LocalRayletDiedError, ray.exceptions.TaskCancelledError)


def _resolve(wrapped: list):
    """``[ref]`` → the ``Commit`` (a ref may itself resolve to ``[ref]``, from an ``Institution`` actor)."""
    obj = ray.get(wrapped[0])
    while isinstance(obj, list) and len(obj) == 1 and isinstance(obj[0], ray.ObjectRef):
        obj = ray.get(obj[0])
    return obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class MergeActor:
    def __init__(self, run_dir: str, cfg_blob: str, institutions: dict, task_options: dict,
                 secret: bytes | None = None, history: str | None = None) -> None:
        import torch

        from sim.main_state import MainState
        from sim.model import load_foundation

        cfg = _config(cfg_blob)
        torch.set_num_threads(cfg.runtime.threads)
        self.cfg, self.cfg_blob, self.options = cfg, cfg_blob, task_options
        self.evals: dict[int, list[ray.ObjectRef]] = {}     # version -> evaluation refs (owned by this process)
        # On the CPU whatever runtime.device says: this actor reserves no GPU, so Ray hides every GPU from it
        # (CUDA_VISIBLE_DEVICES=""), and what it computes — merges, coefficient searches and gate checks on distilled
        # sets — is small; training and evaluation run on the pooled workers, on runtime.device.
        foundation = load_foundation(cfg.model, cfg.data.img_size, "cpu", cfg.runtime.precision)
        # Restarted (or resumed): rebuilt from the log, evaluating again what the dead process had scheduled.
        self.state = MainState.open(run_dir, cfg, institutions, foundation, secret=secret, history=history,
                                    on_apply=self._maybe_evaluate)
        # Fault injection: exit after logging these accepted counts (not again once the log holds them).
        self.kill_after = {n for n in cfg.faults.kill_merge_actor_after if n > self.state.version}

    def ping(self) -> int:
        return self.state.version

    def commit(self, wrapped: list, source: tuple | None = None, note: dict | None = None) -> dict:
        """Receive one commit (``[ref]``); returns its acknowledgement, after it is durably logged.

        ``source = (institution actor, contribution, pulled, index)``: how to have the commit made again if it was
        lost (``index``: which of the refs ``Institution.contribute`` returns). ``note``: flat fields for the log.
        """
        t0 = time.perf_counter()
        commit, attempts, failure = self._receive_contribution(wrapped, source)
        if failure is not None:      # the contribution itself failed, or stayed lost
            contribution = source[1] if source is not None else None
            return self.state.reject_undelivered(failure, contribution, attempts, note)
        ack = self.state.receive_delivered(commit, attempts, note, started=t0)
        if ack.get("event") == "accepted" and not ack.get("duplicate"):
            if self.state.version in self.kill_after:
                os._exit(1)          # fault injection: logged, not acknowledged; Ray restarts us and retries the call
            self._maybe_evaluate(self.state)
        return ack

    def _receive_contribution(self, wrapped: list, source: tuple | None) -> tuple[object, int, str | None]:
        """``(commit, attempts, failure)``: the commit the refs resolve to, made again while it is lost."""
        retries = self.cfg.faults.retries if source is not None else 0
        for attempt in range(1, retries + 2):
            try:
                return _resolve(wrapped), attempt, None
            except LOST as exc:
                if attempt > retries:
                    return None, attempt, f"lost after {attempt} attempts: {_first_line(exc)}"
                institution, contribution, pulled, index = source
                wrapped = [ray.get(institution.contribute.remote(contribution, pulled))[index]]
            except Exception as exc:     # noqa: BLE001 — the training raised: this commit's rejection reason
                return None, attempt, _first_line(exc)
        raise AssertionError("unreachable")

    def pull(self, strategy: str, version: int | None = None) -> tuple:
        """``(version, adapter)`` of ``strategy``'s branch now, or at a past ``version`` (resumed runs); ``None``
        adapter before the first commit."""
        return self.state.pull(strategy, version)

    def pull_accepted(self, institution: int, contribution_id: str, version: int | None = None) -> tuple:
        """``(version, adapter or None)``: the accepted commit a free rider copies (``MainState.pull_accepted``)."""
        return self.state.pull_accepted(institution, contribution_id, version)

    def accepted_ids(self) -> list[str]:
        return list(self.state.acks)

    def _maybe_evaluate(self, state) -> None:
        every = self.cfg.runtime.eval_every
        if every and state.version % every == 0 and state.version not in self.evals:
            self.evals[state.version] = self._evaluate(state)

    def _evaluate(self, state=None) -> list[ray.ObjectRef]:
        """One evaluation task per strategy × task, so they spread over the pool (a mixture of N adapters costs N
        forward passes per image and would otherwise hold one worker while the others idle)."""
        state = state or self.state
        version, snapshot = state.snapshot()
        refs = {s: ray.put({s: p}) for s, p in snapshot.items()}
        return [evaluate_task.options(**self.options).remote(self.cfg_blob, refs[s], [task], version)
                for s in snapshot for task in state.tasks_to_score()]

    def finish(self, references: bool = True) -> dict:
        """Final evaluation (every strategy, plus the references) and the main branch written to disk.

        Every predictor is scored on the same sets, each seen task's pooled test set: the strategies and ``base``
        on ``tasks``, the individual references on the same tasks (``sim.evaluation.evaluate_individual``: one
        adapter per site of the task, a site without an accepted commit counted as the foundation alone).
        Returns values, not refs (refs owned by this actor would die with it): ``evals`` (every evaluation record,
        the periodic ones and the final one), ``base``, ``individual`` (the records of ``individual`` and
        ``individual_local``, tagged in ``strategy``) and the per-strategy storage bytes.
        """
        self.state.finish()           # commits still held at the gate's cold start (sim.main_state)
        version = self.state.version
        self.state.save_main()
        tasks = self.state.tasks_to_score()
        final = self.evals.get(version) or self._evaluate()     # evaluated already if the last commit hit eval_every
        refs, individual = {}, []
        if references:
            from sim.merge.base import base_reference

            # linear heads: the frozen backbone with each task's contributors' average head (prototype: None)
            base = base_reference(list(self.state.latest_adapters().values()))
            refs["base"] = evaluate_task.options(**self.options).remote(self.cfg_blob, {"base": base}, tasks, version)
            # one task per scored task (each scores its sites' adapters on the pooled and the local test sets), so
            # the references spread over the pool beside the strategies' evaluations instead of one long tail
            adapters = ray.put(self.state.latest_adapters())
            individual = [individual_task.options(**self.options).remote(self.cfg_blob, adapters, [task])
                          for task in tasks]
        periodic = [r for v in sorted(self.evals) if v != version for part in ray.get(self.evals[v]) for r in part]
        out = {"version": version, "evals": periodic + [r for part in ray.get(final) for r in part],
               "storage": self.state.storage_bytes()}
        if references:
            out["individual"] = [r for part in ray.get(individual) for r in part]
        return out | {name: ray.get(ref) for name, ref in refs.items()}

    def records(self) -> list[dict]:
        return self.state.records()

    @ray.method(max_task_retries=0)   # not retried after the restart it causes
    def die(self) -> None:
        """Fault injection / tests: kill this process (Ray restarts it, and it rebuilds from the log)."""
        os._exit(1)
