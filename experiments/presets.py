"""Presets: run presets (functions returning a ``SimConfig``) and studies (functions returning a ``Study``).

Run presets follow ml_collections' ``get_config(variant)`` habit. A study is one entry: its base config and grid (each
with a ``smoke`` size for CI), its x axis and the sections of its report; the sweep runs it and writes its layout
(``analysis.layout``) into the sweep dir, which the report reads. ``PRESETS`` and ``STUDIES`` are the registries;
``get_preset`` / ``get_study`` list the known names on a typo. A preset is the starting point; ``--config``, flags and
``--set`` apply on top of it.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from typing import Callable

from analysis.layout import Section, StudyLayout
from sim.config import SimConfig, apply_overrides
from sim.registry import lookup


def default() -> SimConfig:
    """All defaults (12 institutions over 4 synthetic tasks, 2 contributions each, fusion/mixture/svd/ties)."""
    return SimConfig()


def demo() -> SimConfig:
    """What ``make demo`` runs: about 12 institutions over 4 tasks, 2 contributions each, strategies fusion, mixture,
    svd and ties, sized to finish in a few minutes on a 2-core laptop (shorter training and distillation, IPC 5,
    a budget-20 coefficient search), with an evaluation every 8 accepted commits for the forgetting curves."""
    cfg = SimConfig()
    return cfg.replace(
        data=dataclasses.replace(cfg.data, n_tasks=4, institutions=12),
        train=dataclasses.replace(cfg.train, steps=50),
        distill=dataclasses.replace(cfg.distill, ipc=5, iterations=30),
        merge=dataclasses.replace(cfg.merge, strategies=("fusion", "mixture", "svd", "ties"), budget=20),
        schedule=dataclasses.replace(cfg.schedule, contributions=2),
        runtime=dataclasses.replace(cfg.runtime, eval_every=8),
    )


PRESETS: dict[str, Callable[[], SimConfig]] = {"default": default, "demo": demo}


def get_preset(name: str) -> SimConfig:
    """The config of preset ``name``; a typo lists the known presets."""
    return lookup(PRESETS, name, "preset")()


# ------------------------------------------------------------------------------------------
# Studies (``forgesim sweep``)
# ------------------------------------------------------------------------------------------
# The config columns of every study's results.parquet (column -> config field); a study's own x axis joins them.
STANDARD_COLUMNS = {"seed": "seed", "contributors": "data.institutions", "rank": "lora.rank", "ipc": "distill.ipc",
                    "partition": "data.partition", "dataset": "data.name", "attack": "attacks.kind",
                    "attack_share": "attacks.share", "gate": "gate.checks"}


@dataclass(frozen=True)
class Axis:
    """What a study varies: the results ``column`` holding the config ``field``, its name in table headers
    (``label``) and on figure axes (``axis_label``)."""

    column: str
    field: str
    label: str
    axis_label: str


CONTRIBUTORS = Axis("contributors", "data.institutions", "contributors", "contributors (institutions)")


@dataclass(frozen=True)
class Study:
    """One study: every point of ``grid`` (the product of its values, config field -> values) is one Tune trial
    running one simulation of ``base`` with the point's values. ``strategies`` are kept as branches of every trial
    (training is paid once per point, strategies are compared on identical commits); with ``orders`` > 0 each trial
    also re-merges its commits in that many distinct orders (order 0 = the run's), only the points matching
    ``orders_where`` (config field -> value; empty: every point) when it is given; ``order_steps`` scores every branch
    (True) or the strategies it names after every merge step of those orders (OPCM's protocol, ``analysis.steps``).
    ``x`` is the axis its report plots against (None: seeds only) and ``sections`` what its report shows
    (``analysis.layout.Section``).

    ``variants``: grid axes whose values are named bundles of config values (axis -> name -> {field: value}), for
    what one field cannot say (a protocol is a pull policy, a weighting and a schedule mode at once). The grid holds
    the names under the axis (no dot in it); a point's trial runs the bundle (``overrides``), and its results rows
    carry the name in a column of the axis's name (``labels``). A bundle's value may be a function of the point's
    config (the base with the point's other values), for a value that follows another field: async_stale's
    ``max_staleness`` is the point's number of institutions, also when ``--set`` or a grid axis changes it."""

    name: str
    base: SimConfig
    grid: dict[str, tuple] = field(default_factory=dict)
    variants: dict[str, dict[str, dict[str, object]]] = field(default_factory=dict)
    orders: int = 0
    orders_where: dict = field(default_factory=dict)
    order_steps: bool | tuple[str, ...] = False
    description: str = ""
    x: Axis | None = None
    sections: tuple[Section, ...] = ()

    def orders_of(self, point: dict) -> int:
        """How many merge orders the trial of ``point`` replays (0 for a point ``orders_where`` leaves out; a field
        the grid does not vary never leaves one out)."""
        return self.orders if all(point.get(k, v) == v for k, v in self.orders_where.items()) else 0

    def points(self) -> list[dict]:
        """The grid's points, in a fixed order (the last field varies fastest); a variant axis holds its names."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]

    def overrides(self, point: dict, base: SimConfig | None = None) -> dict:
        """The config values of ``point`` (field -> value): its fields, each variant name replaced by its bundle in
        the axis's place; a bundle's function value is called with the point's config over ``base`` (default: the
        study's base)."""
        out: dict = {}
        for key, value in point.items():
            if key in self.variants:
                if value not in self.variants[key]:
                    raise ValueError(f"study {self.name}: {key} {value!r} is not one of "
                                     f"{', '.join(self.variants[key])}")
                out |= self.variants[key][value]
            else:
                out[key] = value
        deferred = {k: v for k, v in out.items() if callable(v)}
        if deferred:
            cfg = apply_overrides(base or self.base, [f"{k}={json.dumps(v)}" for k, v in out.items() if not callable(v)])
            out |= {k: f(cfg) for k, f in deferred.items()}
        return out

    def labels(self, point: dict) -> dict:
        """The variant names of ``point`` (axis -> name), the results columns they become."""
        return {key: point[key] for key in self.variants if key in point}

    @property
    def columns(self) -> dict[str, str]:
        """The config columns of this study's results (column -> config field)."""
        return STANDARD_COLUMNS | ({self.x.column: self.x.field} if self.x else {})

    def layout(self) -> StudyLayout:
        """What the sweep writes into its dir for the report (``analysis.layout``)."""
        x = self.x or Axis("", "", "", "")
        return StudyLayout(self.name, x.column, x.label, x.axis_label, self.columns, self.sections)


def _sized(cfg: SimConfig, smoke: bool) -> SimConfig:
    """The sizes of a study's runs: the demo's (short local training and distillation, a budget-20 search, one
    contribution per institution) or, for ``smoke``, a tiny model and cohort that run in CI in seconds."""
    r = dataclasses.replace
    cfg = cfg.replace(train=r(cfg.train, steps=50), distill=r(cfg.distill, ipc=5, iterations=30),
                      merge=r(cfg.merge, budget=20), schedule=r(cfg.schedule, contributions=1))
    if not smoke:
        return cfg
    return cfg.replace(
        data=r(cfg.data, n_tasks=2, institutions=4, img_size=16, train_per_class=24, val_per_class=4,
               test_per_class=8),
        model=r(cfg.model, patch_size=4, embed_dim=32, depth=2, num_heads=2, pretrain_steps=30, pretrain_batch=32),
        lora=r(cfg.lora, rank=4, alpha=8.0),
        train=r(cfg.train, steps=20, batch_size=16),
        distill=r(cfg.distill, ipc=2, iterations=5, real_batch=8, embed_width=16),
        merge=r(cfg.merge, budget=6),
        runtime=r(cfg.runtime, workers=1))


def _with(cfg: SimConfig, **sections: dict) -> SimConfig:
    return cfg.replace(**{name: dataclasses.replace(getattr(cfg, name), **values) for name, values in sections.items()})


STUDY_STRATEGIES = ("fusion", "mixture", "svd", "ties")


# The scaling study's bounded proxy (``merge.proxy_images``): with every received image a stage's search scores
# N distilled sets, so the sequential searches of a 50-institution run and of the communities built from its log
# grow with N. Measured (``benchmarks/scale.py --sizes 10,50 --set merge.proxy_images=128``, README "Bounded
# proxy"): 13.9 s a commit at N = 50 against 27 s unbounded and 11.0 s at N = 10.
SCALING_PROXY_IMAGES = 128


def scaling(smoke: bool = False) -> Study:
    """Accuracy and cost vs contributors (10-50; smoke 4, 8) × seeds, every strategy, with the joint reference.
    Each institution brings its own data (``data.partition: per_institution``, MedForge's setting: the first N of a
    larger community are the N-community, so more contributors means more data, not the same data split finer);
    ``--set data.partition=pool`` runs the fixed-data control. The searches score a bounded proxy of 128
    distilled images per stage (``merge.proxy_images``, each received set an equal stratified share, so the cost
    of a commit stays flat in N; ``--set merge.proxy_images=0`` scores every image)."""
    cfg = _with(_sized(SimConfig(), smoke), merge={"strategies": STUDY_STRATEGIES,
                                                   "proxy_images": SCALING_PROXY_IMAGES},
                train={"joint": True}, data={"partition": "per_institution"})
    grid = {"data.institutions": (4, 8) if smoke else (10, 20, 30, 40, 50), "seed": (0,) if smoke else (0, 1, 2)}
    return Study("scaling", cfg, grid, description=scaling.__doc__, x=CONTRIBUTORS, sections=(
        Section("Scaling with the number of contributors", "scaling", ("acc", "auc")),
        Section("Cost", "cost", ("mixture_vs_fusion",))))


# The order study's bounded proxy (``merge.proxy_images``): its 20 orders × 12 sequential searches are the study's
# cost, and with every received image each stage's cost grows with the sets received (the last stage scores 12 sets).
# Measured (``benchmarks/studies.py order --proxy-images 0|32``, one 12-institution run, 20 orders, 2 cores): the
# unbounded replays took 242 s, bounded to 32 images 111–124 s (three runs); over the orders fusion's ACC 0.539 / 0.531 (mean),
# 0.128 / 0.129 (range), AUC 0.707 / 0.696; mixture's ACC 0.530 / 0.544, AUC 0.753 / 0.721; svd is order-invariant.
ORDER_PROXY_IMAGES = 32


def order(smoke: bool = False) -> Study:
    """Merge-order sensitivity: per seed, one 12-institution run (smoke: 4) re-merged in 20 seeded orders (smoke:
    3), every strategy; no retraining (the orders replay the run's commits). The run and its replays search on a
    bounded proxy of 32 distilled images per stage (``merge.proxy_images``, each received set an equal, stratified
    share; ``--set merge.proxy_images=0`` scores every image, as a plain run does)."""
    cfg = _with(_sized(SimConfig(), smoke), merge={"strategies": ("fusion", "mixture", "svd"),
                                                   "proxy_images": ORDER_PROXY_IMAGES})
    return Study("order", cfg, {"seed": (0,) if smoke else (0, 1, 2)}, orders=3 if smoke else 20,
                 description=order.__doc__,
                 sections=(Section("Merge-order sensitivity", "orders", ("orders", "orders_per_task")),))


def forgetting(smoke: bool = False) -> Study:
    """Per-task accuracy after every merge (forgetting, BWT) of 2 contributions per institution, every strategy."""
    cfg = _with(_sized(SimConfig(), smoke), merge={"strategies": STUDY_STRATEGIES},
                schedule={"contributions": 2}, runtime={"eval_every": 1})
    return Study("forgetting", cfg, {"seed": (0,) if smoke else (0, 1, 2)}, description=forgetting.__doc__,
                 sections=(Section("Forgetting", "forgetting"),))


def ipc(smoke: bool = False) -> Study:
    """Distilled images per class 1, 5, 10, 20, 50 (smoke: 1, 2) × DM's init (real images or noise; smoke: real)
    × seeds, with the fidelity and privacy audit (nearest-neighbour memorisation and a per-record LiRA
    membership-inference attack with 2 shadows: TPR at 1 % FPR for all members and the exposed ones)."""
    cfg = _with(_sized(SimConfig(), smoke), merge={"strategies": ("fusion", "mixture")},
                distill={"audit": True, "audit_shadows": 2})
    return Study("ipc", cfg, {"distill.ipc": (1, 2) if smoke else (1, 5, 10, 20, 50),
                              "distill.init": ("real",) if smoke else ("real", "noise"),
                              "seed": (0,) if smoke else (0, 1, 2)}, description=ipc.__doc__,
                 x=Axis("ipc", "distill.ipc", "IPC", "images per class (IPC)"),
                 sections=(Section("Distillation budget (IPC), fidelity and privacy", "ipc", ("acc",)),))


def rank(smoke: bool = False) -> Study:
    """LoRA rank 2, 4, 8, 16, 32 (smoke: 2, 4) × seeds: accuracy and storage."""
    cfg = _with(_sized(SimConfig(), smoke), merge={"strategies": STUDY_STRATEGIES})
    grid = {"lora.rank": (2, 4) if smoke else (2, 4, 8, 16, 32), "seed": (0,) if smoke else (0, 1, 2)}
    return Study("rank", cfg, grid, description=rank.__doc__, x=Axis("rank", "lora.rank", "rank", "LoRA rank r"),
                 sections=(Section("LoRA rank", "rank", ("acc",)),))


# The seed papers' protocols (``analysis.claims`` holds what each paper claims and how a sweep tests it) --------------
CLAIMS_SECTION = Section("Claims side by side", tables=("claims",))
# MedForge Table 3 compares its DM-DSA distilled sets with other ways of making the proxy sets; here: the registry's
# other distillers (``sim.distill.DISTILLERS``: random and herding real images, DM's untrained noise init).
MEDFORGE_DISTILLERS = ("dm", "random", "herding")


def medforge(smoke: bool = False) -> Study:
    """MedForge's protocol (Tan et al., arXiv 2502.16055): 3 tasks with one institution each, LoRA rank 16 and alpha
    16, IPC 20 distilled sets, an NGOpt search of budget 40 per stage, Fusion and Mixture with the base, individual
    and joint references; the grid crosses the distiller (``distill.method``: dm, i.e. DM with DSA, vs the random
    and herding coresets of the DM paper's baselines; MedForge Table 3) with seeds 0-2 (9 trials), and each dm
    trial re-merges its 3 commits in all 3! = 6 orders (MedForge Table 2; the other distillers' trials only feed
    the distiller claim, so they replay none). Smoke: a tiny model, budget 6, dm vs random, seed 0 (2 trials).
    Sizes on a 2-core laptop (unloaded, estimated): smoke ≈ 2 min, full ≈ 12-15 min (50 training steps, 30 DM
    iterations per contribution, 3 joint trainings)."""
    r = dataclasses.replace
    cfg = _sized(SimConfig(), smoke)
    cfg = _with(cfg, data={"n_tasks": 3, "institutions": 3}, lora={"rank": 16, "alpha": 16.0},
                distill={"ipc": 20, "dsa": True}, train={"joint": True},
                merge={"strategies": ("fusion", "mixture"), "optimizer": "NGOpt",
                       "budget": cfg.merge.budget if smoke else 40})
    cfg = cfg.replace(schedule=r(cfg.schedule, contributions=1, init_from="base"))
    grid = {"distill.method": MEDFORGE_DISTILLERS[:2] if smoke else MEDFORGE_DISTILLERS,
            "seed": (0,) if smoke else (0, 1, 2)}
    return Study("medforge", cfg, grid, orders=6, orders_where={"distill.method": "dm"},
                 description=medforge.__doc__, sections=(
        CLAIMS_SECTION, Section("Merge-order sensitivity", "orders", ("orders", "orders_per_task"))))


# Med-LEGO Table 1's merges that forgesim has (``sim.merge.specs.SPECS``): LoRA averaging, task arithmetic, TIES,
# MagMax and the SVD merge (ViT averaging and PEM composition merge full weights / negated modules: not here).
MEDLEGO_STRATEGIES = ("lora_avg", "task_arithmetic", "ties", "magmax", "svd")


def medlego(smoke: bool = False) -> Study:
    """Med-LEGO's cross-domain protocol (Zhu et al., arXiv 2503.01164, Table 1): one institution per task (each task
    its own modality), per-task linear heads trained with the adapter (the merged backbone update is scored with each
    task's own head), LoRA rank 4 on qkv, the training-free merges of Table 1 with the base, individual and joint
    references; 5 tasks (digits holds 5), seeds 0-2. The merges use no proxy data, so the institutions send random
    real images (no distillation cost). Smoke: a tiny model, 3 tasks, seeds 0 and 1 (2 trials). Sizes on a 2-core
    laptop: smoke ≈ 1 min, full ≈ 5 min."""
    r = dataclasses.replace
    n = 3 if smoke else 5
    cfg = _with(_sized(SimConfig(), smoke), data={"n_tasks": n, "institutions": n}, model={"head": "linear"},
                lora={"rank": 4}, distill={"method": "random"}, train={"joint": True},
                merge={"strategies": MEDLEGO_STRATEGIES})
    cfg = cfg.replace(schedule=r(cfg.schedule, contributions=1, init_from="base"))
    return Study("medlego", cfg, {"seed": (0, 1) if smoke else (0, 1, 2)}, description=medlego.__doc__,
                 sections=(CLAIMS_SECTION,))


# The strategies whose branches the full strategies study scores after every merge step (each step of each order is
# an evaluation on every task): the continual merges, which differ there, and the one-shot merges they continue.
STEPPED = ("opcm", "continual_task_arithmetic", "continual_ties", "continual_weight_average", "continual_magmax",
           "task_arithmetic", "ties", "magmax", "fusion", "mixture")


def strategies(smoke: bool = False) -> Study:
    """Every registered merge strategy side by side (``sim.merge.specs.SPECS``, each a branch of the same run, so all
    merge identical commits): 12 institutions on ``synthetic`` and on ``digits`` × seeds 0-2, each run re-merged in 5
    seeded orders; the continual merges and the merges they continue (``STEPPED``) are scored after every merge step
    of every order (OPCM's protocol). The report gives per strategy ACC and AUC, their range over orders, storage,
    inference cost and merge time, and accuracy on the tasks merged so far and forgetting per step (mean ± sd over
    orders). Smoke: the tiny model, 4 institutions, synthetic, seed 0, 2 orders, every strategy scored per step (one
    trial)."""
    from sim.merge.specs import SPECS

    cfg = _with(_sized(SimConfig(), smoke), merge={"strategies": tuple(SPECS)})
    grid = {"data.name": ("synthetic",) if smoke else ("synthetic", "digits"), "seed": (0,) if smoke else (0, 1, 2)}
    return Study("strategies", cfg, grid, orders=2 if smoke else 5, order_steps=True if smoke else STEPPED,
                 description=strategies.__doc__,
                 sections=(Section("Strategies side by side", tables=("strategies",)),
                           Section("Merge-order sensitivity", "orders", ("orders",)),
                           Section("Accuracy and forgetting per merge step", "steps", ("steps",))))


GATE_ALL = ("norm", "cosine", "duplicate", "fit", "regression")
# The poisoning study's branches: two undefended merges and the mixture beside the robust aggregators (sim.merge.robust)
POISONING_STRATEGIES = ("ties", "svd", "mixture", "median", "trimmed_mean", "clipped_mean")
ATTACK_SHARE = Axis("attack_share", "attacks.share", "malicious share", "share of malicious institutions")


def poisoning(smoke: bool = False) -> Study:
    """Registered institutions that attack (``attacks:``) and the gate that keeps them out (``gate:``): attack kind
    (scale, sign_flip, label_flip, backdoor, distill_mismatch, free_rider) × malicious share 0, 10, 20, 30 % × gate
    off / on (every check) × seeds 0-2, 10 institutions; ties, svd and mixture beside the robust aggregators median,
    trimmed_mean and clipped_mean (the defence without a gate). The report gives per setting and strategy the clean
    accuracy, its drop from the same seed's run without attackers, the backdoor's success and the gate's true and
    false positive rates. Smoke: the tiny model, 4 institutions, ties, svd and mixture, scale attacks (× 100), share 0
    and 50 %, the gate on, seed 0; the tiny model's adapters are near chance, so the smoke's fit and regression
    thresholds are loose (min_fit 0, max_drop and -min_gain 0.5): it checks the pipeline, not the gate's rates."""
    gate = {"min_history": 2, "min_fit": 0.0, "max_drop": 0.5, "min_gain": -0.5} if smoke else {}
    strategies = POISONING_STRATEGIES[:3] if smoke else POISONING_STRATEGIES
    cfg = _with(_sized(SimConfig(), smoke), merge={"strategies": strategies},
                data={"institutions": 4 if smoke else 10}, gate=gate, attacks={"scale": 100.0} if smoke else {})
    grid = {"attacks.kind": ("scale",) if smoke else ("scale", "sign_flip", "label_flip", "backdoor",
                                                      "distill_mismatch", "free_rider"),
            "attacks.share": (0.0, 0.5) if smoke else (0.0, 0.1, 0.2, 0.3),
            "gate.checks": (GATE_ALL,) if smoke else ((), GATE_ALL), "seed": (0,) if smoke else (0, 1, 2)}
    return Study("poisoning", cfg, grid, description=poisoning.__doc__, x=ATTACK_SHARE,
                 sections=(Section("Attacks and the gate", tables=("poisoning",)),))


SIGMA = Axis("sigma", "schedule.speed_sigma", "σ", "speed heterogeneity σ (lognormal sigma of institution speeds)")
# The asynchrony study's branches: LoRA averaging (FedIT's FedAvg of the factors, the branch every protocol that
# starts from main pulls), TIES and MedForge's sequential fusion.
ASYNCHRONY_STRATEGIES = ("lora_avg", "ties", "fusion")


def one_per_institution(cfg: SimConfig) -> int:
    """async_stale's ``max_staleness``: the point's number of institutions (one commit per institution behind)."""
    return cfg.data.institutions


def asynchrony_protocols() -> dict[str, dict[str, object]]:
    """The asynchrony study's protocols as config bundles, on the same cohort, schedule draws and budget:

    * ``medforge``: MedForge's — every adapter from the foundation (``init_from: base``), merged on arrival;
    * ``async_stale``: asynchronous with staleness (FedBuff, Nguyen et al. 2022): each contribution starts from main
      (``init_from: main``), commits are merged on arrival weighted by 1 / (1 + staleness), and a commit more than
      one commit per institution behind main (``max_staleness`` = the number of institutions) is rejected;
    * ``sync_rounds``: synchronous rounds (FedAvg, McMahan et al. 2017): everyone pulls main when a round starts,
      the round's commits are merged at its barrier (its slowest member's arrival), unweighted.
    """
    return {"medforge": {"schedule.init_from": "base", "schedule.protocol": "async",
                         "schedule.staleness_weighting": False, "schedule.max_staleness": -1},
            "async_stale": {"schedule.init_from": "main", "schedule.protocol": "async",
                            "schedule.staleness_weighting": True, "schedule.max_staleness": one_per_institution},
            "sync_rounds": {"schedule.init_from": "main", "schedule.protocol": "sync_rounds",
                            "schedule.staleness_weighting": False, "schedule.max_staleness": -1}}


def asynchrony(smoke: bool = False) -> Study:
    """Institutions of heterogeneous speed (lognormal σ 0, 0.5, 1, 1.5) under three protocols on the same cohort and
    budget (``asynchrony_protocols``: medforge, async_stale, sync_rounds) × seeds 0-2: 12 institutions over 4 tasks,
    3 contributions each, compute-bound (``schedule.arrival: eager``: each starts its next contribution as soon as it
    may) with an upload delay of mean 0.1 training times, branches lora_avg (pulled), ties and fusion, every branch
    scored on every task after every merge (``runtime.eval_tasks: all``). The report gives accuracy over virtual time,
    the time to 90 % of the final accuracy (FedScale's time-to-accuracy), the staleness of the accepted commits and the
    idle time of the fast institutions. Smoke: the tiny model, 4 institutions × 2 contributions (hosted by one actor),
    lora_avg and ties, σ 1, the three protocols, seed 0 (3 trials)."""
    n = 4 if smoke else 12
    cfg = _with(_sized(SimConfig(), smoke), data={"institutions": n},
                merge={"strategies": ASYNCHRONY_STRATEGIES[:2] if smoke else ASYNCHRONY_STRATEGIES},
                schedule={"arrival": "eager", "contributions": 2 if smoke else 3, "commit_delay": 0.1,
                          "pull_strategy": "lora_avg"},
                runtime={"eval_every": 1, "eval_tasks": "all"} | ({"institutions_per_actor": n} if smoke else {}))
    grid = {"schedule.speed_sigma": (1.0,) if smoke else (0.0, 0.5, 1.0, 1.5),
            "protocol": tuple(asynchrony_protocols()), "seed": (0,) if smoke else (0, 1, 2)}
    return Study("asynchrony", cfg, grid, variants={"protocol": asynchrony_protocols()}, description=asynchrony.__doc__,
                 x=SIGMA, sections=(Section("Asynchrony: accuracy over virtual time", "time_to_accuracy", ("asynchrony",)),
                                    Section("Staleness and idle time", "staleness_idle")))


STUDIES: dict[str, Callable[[bool], Study]] = {"scaling": scaling, "order": order, "forgetting": forgetting,
                                               "ipc": ipc, "rank": rank, "medforge": medforge, "medlego": medlego,
                                               "strategies": strategies, "poisoning": poisoning,
                                               "asynchrony": asynchrony}


def get_study(name: str, smoke: bool = False) -> Study:
    """Study preset ``name`` at full or smoke size; a typo lists the known studies."""
    return lookup(STUDIES, name, "study")(smoke)
