"""The branches: one merged predictor per strategy over the same stream of accepted commits, and ``main/`` on disk."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from sim.commit import Commit
from sim.config import SimConfig
from sim.data.base import DistilledSet, derive_seed
from sim.merge import Mixture, Router, StrategySpec, get_spec, merge, merge_step, save_predictor, start_sequence
from sim.merge.api import ArrivedProxy, SequentialState, continual_step
from sim.merge.mixture import ProbabilityCache
from sim.model import Adapter, Foundation

Predictor = Adapter | Mixture | Router | None


class MainBranches:
    """One branch per strategy over the same commit stream; what each branch does is read from its strategy's spec.

    A sequential strategy (``StrategySpec.sequential``: fusion, mixture) with ``merge.search_mode: sequential``:
    MedForge's merge as commits arrive (``merge_step``), the two stage coefficients searched on the proxy — the
    latest distilled set of every institution received so far. With ``global``: all N coefficients searched again
    on each commit (the proxy goes to every strategy whose spec ``needs_proxy``; a data-aware one gets the set each
    adapter arrived with). A continual strategy (``StrategySpec.continual``: OPCM and the running baselines) is
    stepped with each commit (``continual_step``), keeping only its state, so arrival order is part of the result;
    with staleness weighting the commit's weight is its default times 1/(1 + staleness). A fitted one
    (``StrategySpec.fitted``: the routers) is trained again on each commit on every distilled set received (each
    adapter's own), the experts' probabilities on the sets kept across commits; it takes no weights, so no staleness
    weighting. Every other strategy:
    ``merge`` over every accepted adapter, with its default weights — or, with ``schedule.staleness_weighting``,
    each commit's weight times 1/(1 + staleness) (renormalised for the averaging strategies). Searched strategies
    are not staleness-weighted: their coefficients are fitted on the proxy instead.

    Merges are deterministic: each is seeded from the run seed, the strategy and the commit's sequence number, so
    replaying the accepted commits in order rebuilds the same branches.
    """

    def __init__(self, strategies: Sequence[str], cfg: SimConfig, foundation: Foundation) -> None:
        self.strategies = tuple(strategies)
        self.specs: dict[str, StrategySpec] = {s: get_spec(s) for s in self.strategies}   # an unknown name fails here
        self.cfg, self.foundation = cfg, foundation
        self.adapters: list[Adapter] = []
        self.staleness: list[int] = []
        # the set each adapter came with, and whose it is; the proxy is the latest set of every source (``seen``)
        self.arrived: ArrivedProxy = ArrivedProxy((), ())
        self.states: dict[str, SequentialState] = {}
        self.merged: dict[str, Predictor] = {s: None for s in self.strategies}
        # a fitted branch's experts' probabilities on the sets received (content-keyed, so a rejected proposal's
        # entries are harmless)
        self.caches: dict[str, ProbabilityCache] = {s: ProbabilityCache() for s in self.strategies
                                                    if self.specs[s].fitted}

    # -- reading --------------------------------------------------------------------------
    def predictor(self, strategy: str) -> Predictor:
        """``strategy``'s branch now; ``None`` before the first commit."""
        return self.merged[strategy]

    def snapshot(self) -> dict[str, Predictor]:
        """Every branch now, ``{strategy: predictor}`` (a copy: later commits do not change it)."""
        return dict(self.merged)

    # -- merging --------------------------------------------------------------------------
    def share_probability_cache(self, cache) -> None:
        """Start the output-space branches' sequences with ``cache`` (a ``sim.merge.mixture.ProbabilityCache``):
        replays of the same commits in other orders then compute each adapter's proxy probabilities once."""
        for s in self.strategies:
            if self.specs[s].fitted:
                self.caches[s] = cache
            elif self.specs[s].space == "output" and self.specs[s].sequential:
                self.states[s] = dataclasses.replace(start_sequence(s), cache=cache)

    def add(self, commit: Commit, seq: int, staleness: int) -> list[dict]:
        """Merge ``commit`` into every branch now (``propose`` then ``apply``); returns the merge records."""
        update, records = self.propose(commit, seq, staleness)
        self.apply(update)
        return records

    def _sequential(self, strategy: str) -> bool:
        return self.specs[strategy].sequential and self.cfg.merge.search_mode == "sequential"

    def _weights(self, strategy: str, staleness: list[int]) -> np.ndarray | None:
        if not self.cfg.schedule.staleness_weighting:
            return None
        base = self.specs[strategy].default_weights(len(staleness))
        factor = 1.0 / (1.0 + np.asarray(staleness, dtype=np.float64))
        if np.isclose(base.sum(), 1.0):
            return factor / factor.sum()
        return base * factor

    def _merge_branch(self, s: str, commit: Commit, adapters: list[Adapter], stale: list[int],
                      proxy: list[DistilledSet], arrived: ArrivedProxy,
                      seed: int) -> tuple[SequentialState | None, Predictor, dict]:
        """``(sequential state or None, merged predictor, merge record fields)`` of branch ``s`` with ``commit``."""
        if self._sequential(s):
            state = merge_step(self.states.get(s) or start_sequence(s), commit.adapter, foundation=self.foundation,
                               proxy=proxy, cfg=self.cfg.merge, seed=seed)
            rec = {k: v for k, v in state.stages[-1].items() if k != "trace"}
            rec["coefficients"] = np.asarray(state.coefficients).tolist()
            return state, state.merged, rec
        spec = self.specs[s]
        if spec.continual:      # stepped as commits arrive: only the branch's state is kept
            weight = (float(spec.default_weights(1)[0]) / (1.0 + stale[-1])
                      if self.cfg.schedule.staleness_weighting else None)
            state, res = continual_step(s, self.states.get(s), commit.adapter, self.merged[s], cfg=self.cfg.merge,
                                        weight=weight)
            return state, res.merged, res.record()
        if spec.fitted:         # trained on every set received, each adapter's own
            res = merge(s, adapters, cfg=self.cfg.merge, foundation=self.foundation, proxy=arrived, seed=seed,
                        cache=self.caches[s])
            return None, res.merged, res.record()
        given = (arrived if spec.statistic_impl is not None    # per-contributor statistics: each adapter's own set
                 else proxy if spec.needs_proxy else None)
        res = merge(s, adapters, self._weights(s, stale), cfg=self.cfg.merge, foundation=self.foundation,
                    proxy=given, seed=seed)
        rec = res.record()
        if res.coefficients is not None:
            rec["coefficients"] = np.asarray(res.coefficients).tolist()
        return None, res.merged, rec

    def propose(self, commit: Commit, seq: int, staleness: int) -> tuple[dict, list[dict]]:
        """Every branch with ``commit`` merged in, without changing this object: ``(update, merge records)``.

        Raises whatever a merge raises; ``apply(update)`` makes the update current.
        """
        adapters = self.adapters + [commit.adapter]
        stale = self.staleness + [staleness]
        arrived = ArrivedProxy(self.arrived.sets + (commit.distilled,), self.arrived.sources + (commit.institution,))
        proxy = arrived.seen(len(arrived) - 1)            # the latest set of every institution, first-arrival order
        states, merged, records = {}, {}, []
        for s in self.strategies:
            seed = derive_seed(self.cfg.seed, "merge", s, seq)
            state, merged[s], rec = self._merge_branch(s, commit, adapters, stale, proxy, arrived, seed)
            if state is not None:
                states[s] = state
            records.append({"event": "merged", "seq": seq, "id": commit.id, "strategy": s} | rec)
        update = {"adapters": adapters, "staleness": stale, "arrived": arrived,
                  "states": states, "merged": merged}
        return update, records

    def apply(self, update: dict) -> None:
        """Make a ``propose`` update current."""
        self.adapters, self.staleness = update["adapters"], update["staleness"]
        self.arrived = update["arrived"]
        self.states |= update["states"]
        self.merged |= update["merged"]


def save_main(snapshot: Mapping[str, Predictor], out_dir: str | Path) -> Path:
    """``main/<strategy>/``: a peft adapter dir, a mixture dir (``save_mixture``) or a router dir (``save_router``);
    branches without a commit are skipped."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for strategy, predictor in snapshot.items():
        if predictor is None:
            continue
        target = out / strategy
        shutil.rmtree(target, ignore_errors=True)
        save_predictor(predictor, target)
    return out


