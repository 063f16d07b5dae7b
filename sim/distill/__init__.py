"""Dataset distillation: what an institution sends instead of its raw images.

One registry, ``DISTILLERS``, maps a method name to a function

    fn(real: list[Tensor], cfg: DistillConfig, gen: torch.Generator, foundation) -> (list[Tensor], dict)

taking one tensor of real pixels (n_c, 3, S, S) in [0, 1] per class and returning the distilled pixels per
class plus method statistics. Every distiller draws from the ``torch.Generator`` it is given and from nothing
else (no global RNG). ``distill`` wraps a distiller: it groups a ``Split`` by class, runs the method and
returns a ``DistilledSet`` whose ``meta`` reports per-class real counts, short, empty and rare classes and
timings. ``sim.distill.audit`` measures fidelity and privacy of the result.

| name | what is sent | private? |
|---|---|---|
| ``dm`` | synthetic images learned by Distribution Matching with DSA (Zhao & Bilen) | should be |
| ``random`` | random real images | no (reference) |
| ``herding`` | real images chosen by herding in foundation feature space | no (reference) |
| ``noise`` | DM's untrained noise init | yes (the floor) |

Short classes: a class with fewer real images than IPC gets ``ipc`` synthetic images from ``dm``/``noise``
but only its ``n_c`` real images from ``random``/``herding``; a class with no real image gets none.
"""
from __future__ import annotations

from sim.registry import LazyRegistry, lazy_exports

# name -> fn(real per class, cfg, gen, foundation) -> (distilled per class, stats). Names are read without importing
# torch (``DistillConfig`` validates ``distill.method`` against them); a function is imported when looked up.
DISTILLERS = LazyRegistry({
    "dm": "sim.distill.dm:dm",
    "random": "sim.distill.baselines:random",
    "herding": "sim.distill.baselines:herding",
    "noise": "sim.distill.baselines:noise",
})

_EXPORTS = {"distill": "sim.distill.api:distill", "get_distiller": "sim.distill.api:get_distiller",
            "RARE_PREVALENCE": "sim.distill.api:RARE_PREVALENCE"}
__all__ = ["DISTILLERS", *_EXPORTS]
__getattr__ = lazy_exports(__name__, _EXPORTS)
