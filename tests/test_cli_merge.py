"""``forgesim merge``: round trips over peft adapter dirs, mixtures, proxy search, and clean failures."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml

from experiments.cli import main
from sim.config import MergeConfig, config_to_dict
from sim.data.base import DistilledSet
from sim.merge import load_mixture, merge
from sim.model import PEFT_PREFIX, Adapter, load_adapter, save_adapter

MODULES = ("blocks.0.attn.qkv", "blocks.1.attn.qkv")

pytestmark = pytest.mark.usefixtures("single_thread")



def make_adapter(seed: int, r: int = 3, out_f: int = 96, in_f: int = 32, base: str | None = "base0",
                 modules: tuple[str, ...] = MODULES, alpha: float = 6.0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    w = {}
    for m in modules:
        w[f"{PEFT_PREFIX}{m}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.1
        w[f"{PEFT_PREFIX}{m}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.1
    return Adapter(w, alpha, base, meta={"task": "t"})


def write(tmp_path, name: str, adapter: Adapter) -> str:
    return str(save_adapter(adapter, tmp_path / name))


def write_peft_dir(tmp_path, seed: int) -> tuple[str, Adapter]:
    """An adapter dir written by peft itself (no forgesim metadata), and the same factors as an Adapter."""
    from peft import LoraConfig, get_peft_model

    model = torch.nn.ModuleDict({"blocks": torch.nn.ModuleList(
        [torch.nn.ModuleDict({"attn": torch.nn.ModuleDict({"qkv": torch.nn.Linear(32, 96)})}) for _ in range(2)])})
    peft_model = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=["qkv"]))
    like = make_adapter(seed)
    with torch.no_grad():
        for m in MODULES:
            layer = peft_model.base_model.model.get_submodule(m)
            layer.lora_A["default"].weight.copy_(like.factors(m)[0])
            layer.lora_B["default"].weight.copy_(like.factors(m)[1])
    out = tmp_path / f"peft{seed}"
    peft_model.save_pretrained(str(out))
    assert not (out / "forgesim_adapter.json").exists()
    return str(out), like


def test_svd_round_trip(tmp_path, capsys):
    # Prepare
    adapters = [make_adapter(i) for i in range(3)]
    dirs = [write(tmp_path, f"a{i}", a) for i, a in enumerate(adapters)]
    out = tmp_path / "merged"
    # Execute
    code = main(["merge", "--strategy", "svd", "--adapters", *dirs, "--svd-threshold", "0.8", "--rank", "4",
                 "--out", str(out)])
    # Assert: the written peft dir holds what the library computes, and merge.json says how
    assert code == 0
    merged = load_adapter(out)
    expected = merge("svd", adapters, cfg=MergeConfig(svd_threshold=0.8, svd_rank=4)).merged
    for m in MODULES:
        torch.testing.assert_close(merged.delta(m), expected.delta(m))
        assert merged.rank(m) <= 4 and merged.scaling(m) == 1.0
    assert merged.base_fingerprint == "base0"
    summary = json.loads((out / "merge.json").read_text())
    assert summary["strategy"] == "svd" and summary["merge_config"]["svd_rank"] == 4
    assert "svd: 3 adapters -> adapter of max rank" in capsys.readouterr().out


def test_peft_written_dirs_and_weights(tmp_path):
    # Prepare: one dir from peft itself (no base fingerprint), one from forgesim
    peft_dir, peft_like = write_peft_dir(tmp_path, seed=7)
    ours = make_adapter(8)
    # Execute
    code = main(["merge", "--strategy", "task_arithmetic", "--adapters", peft_dir, write(tmp_path, "b", ours),
                 "--weights", "0.5,2", "--out", str(tmp_path / "out")])
    # Assert
    assert code == 0
    merged = load_adapter(tmp_path / "out")
    for m in MODULES:
        torch.testing.assert_close(merged.delta(m), 0.5 * peft_like.delta(m) + 2.0 * ours.delta(m),
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["tsv", "iso_c", "iso_cts", "knots", "opcm", "continual_task_arithmetic",
                                      "continual_ties", "continual_weight_average", "continual_magmax"])
def test_subspace_and_continual_merges_on_peft_written_dirs(strategy, tmp_path, capsys):
    # Prepare: plain peft adapter dirs (no forgesim metadata)
    dirs, likes = zip(*(write_peft_dir(tmp_path, seed) for seed in (3, 4, 5)))
    out = tmp_path / "merged"
    # Execute
    code = main(["merge", "--strategy", strategy, "--adapters", *dirs, "--out", str(out)])
    # Assert: the written dir is what the library computes on the same factors
    assert code == 0, capsys.readouterr().err
    merged = load_adapter(out)
    expected = merge(strategy, list(likes), cfg=MergeConfig()).merged
    for m in MODULES:
        torch.testing.assert_close(merged.delta(m), expected.delta(m), atol=1e-5, rtol=1e-4)
    assert json.loads((out / "merge.json").read_text())["strategy"] == strategy


@pytest.mark.parametrize("strategy, flags, cfg", [("trimmed_mean", ["--trim", "0.3"], MergeConfig(trim=0.3)),
                                                   ("clipped_mean", ["--clip-norm", "0.5"], MergeConfig(clip_norm=0.5)),
                                                   ("median", [], MergeConfig())])
def test_robust_merges_take_their_flags(strategy, flags, cfg, tmp_path, capsys):
    # Prepare: four contributors, so that --trim 0.3 drops ⌊1.2⌋ = 1 at each end
    dirs = [write(tmp_path, f"a{i}", make_adapter(i)) for i in range(4)]
    out = tmp_path / "merged"
    # Execute
    code = main(["merge", "--strategy", strategy, "--adapters", *dirs, *flags, "--out", str(out)])
    # Assert: the written dir is the library's merge with the flag's option (and differs from the default's)
    assert code == 0, capsys.readouterr().err
    got = load_adapter(out)
    adapters = [load_adapter(d) for d in dirs]
    expected, default = merge(strategy, adapters, cfg=cfg).merged, merge(strategy, adapters, cfg=MergeConfig()).merged
    for m in got.modules():
        torch.testing.assert_close(got.delta(m), expected.delta(m), atol=1e-5, rtol=1e-4)
    assert not flags or not torch.allclose(got.delta(got.modules()[0]), default.delta(got.modules()[0]))
    code = main(["merge", "--strategy", "trimmed_mean", "--adapters", *dirs, "--trim", "0.5", "--out",
                 str(tmp_path / "bad")])
    assert code == 2 and "merge.trim" in capsys.readouterr().err


def test_mixture_writes_its_adapters_and_weights(tmp_path):
    adapters = [make_adapter(i) for i in range(2)]
    dirs = [write(tmp_path, f"a{i}", a) for i, a in enumerate(adapters)]
    code = main(["merge", "--strategy", "mixture", "--adapters", *dirs, "--weights", "0.25,0.75",
                 "--out", str(tmp_path / "mix")])
    assert code == 0
    mix = load_mixture(tmp_path / "mix")
    np.testing.assert_allclose(mix.weights, [0.25, 0.75])
    doc = json.loads((tmp_path / "mix" / "mixture.json").read_text())
    assert doc["adapters"] == ["adapter_000", "adapter_001"]
    torch.testing.assert_close(mix.adapters[1].delta(MODULES[0]), adapters[1].delta(MODULES[0]))


def three_institutions(cohort) -> list:
    """Institutions 0 and 1 and the next one of institution 0's task: two tasks, one of them twice."""
    first, second = cohort.institutions[:2]
    third = next(i for i in cohort.institutions[2:] if i.task == first.task)
    assert first.task != second.task
    return [first, second, third]


@pytest.fixture()
def search_inputs(tmp_path, tiny_cfg, tiny_foundation, tiny_cohort):
    """Three adapters on the tiny foundation, each with the proxy .npz of its institution (same order), and the
    config file that rebuilds that foundation."""
    shape = tuple(tiny_foundation.weight(MODULES[0]).shape)
    dirs, proxy_files = [], []
    for i, inst in enumerate(three_institutions(tiny_cohort)):
        adapter = make_adapter(i, out_f=shape[0], in_f=shape[1], base=tiny_foundation.fingerprint)
        adapter.meta["task"] = inst.task
        dirs.append(write(tmp_path, f"a{i}", adapter))
        proxy = DistilledSet(inst.task, inst.classes, inst.train.x[:12].astype(np.float32) / 255.0,
                             inst.train.y[:12])
        proxy_files.append(str(proxy.save(tmp_path / f"distilled{i}.npz")))
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(config_to_dict(tiny_cfg)))
    return dirs, proxy_files, str(cfg_file)


@pytest.mark.parametrize("strategy", ["fusion", "mixture"])
def test_search_on_proxy_data(strategy, tmp_path, search_inputs):
    dirs, proxy_files, cfg_file = search_inputs
    out = tmp_path / "searched"
    code = main(["merge", "--strategy", strategy, "--adapters", *dirs, "--proxy", *proxy_files, "--config", cfg_file,
                 "--budget", "5", "--seed", "3", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "merge.json").read_text())
    assert len(summary["trace"]) == 2 * 5 and len(summary["stages"]) == 3      # sequential: 2 searches of 5
    assert len(summary["coefficients"]) == 3
    assert summary["record"]["objective"] <= summary["record"]["initial_objective"]


def test_sequential_cli_merge_is_the_one_shot_merge_with_sets_paired_by_position(tmp_path, search_inputs, tiny_cfg,
                                                                                 tiny_foundation):
    # Prepare: the same adapters and sets through the API, one set per adapter in arrival order
    dirs, proxy_files, cfg_file = search_inputs
    adapters = [load_adapter(d) for d in dirs]
    sets = [DistilledSet.load(f) for f in proxy_files]
    # Execute
    out = tmp_path / "seq"
    assert main(["merge", "--strategy", "fusion", "--adapters", *dirs, "--proxy", *proxy_files, "--config",
                 cfg_file, "--budget", "4", "--seed", "3", "--out", str(out)]) == 0
    api = merge("fusion", adapters, cfg=dataclasses.replace(tiny_cfg.merge, budget=4), foundation=tiny_foundation,
                proxy=sets, seed=3)
    # Assert: the CLI's coefficients are the API's, and a global search takes any number of sets
    np.testing.assert_allclose(json.loads((out / "merge.json").read_text())["coefficients"], api.coefficients)
    assert main(["merge", "--strategy", "mixture", "--adapters", *dirs, "--proxy", proxy_files[0], "--config",
                 cfg_file, "--budget", "3", "--search-mode", "global", "--out", str(tmp_path / "glob")]) == 0



def test_merge_cli_batched_search_is_the_apis(tmp_path, search_inputs, tiny_cfg, tiny_foundation):
    # Prepare
    dirs, proxy_files, cfg_file = search_inputs
    adapters, sets = [load_adapter(d) for d in dirs], [DistilledSet.load(f) for f in proxy_files]
    flags = ["--budget", "5", "--seed", "3", "--optimizer", "CMA"]
    # Execute
    out = tmp_path / "batched"
    code = main(["merge", "--strategy", "fusion", "--adapters", *dirs, "--proxy", *proxy_files, "--config", cfg_file,
                 *flags, "--search-batch", "2", "--out", str(out)])
    api = merge("fusion", adapters, cfg=dataclasses.replace(tiny_cfg.merge, budget=5, optimizer="CMA", search_batch=2),
                foundation=tiny_foundation, proxy=sets, seed=3)
    # Assert: the API's coefficients; a sequential optimizer cannot be batched (exit 2, naming the field)
    assert code == 0
    np.testing.assert_allclose(json.loads((out / "merge.json").read_text())["coefficients"], api.coefficients)
    assert main(["merge", "--strategy", "fusion", "--adapters", *dirs, "--proxy", *proxy_files, "--config", cfg_file,
                 "--optimizer", "Cobyla", "--search-batch", "2", "--out", str(tmp_path / "bad")]) == 2


@pytest.mark.parametrize("strategy", ["regmean", "fisher"])
def test_data_aware_merge_computes_statistics_on_each_adapters_set(strategy, tmp_path, search_inputs,
                                                                   tiny_foundation):
    # Prepare
    from sim.merge import data_aware

    dirs, proxy_files, cfg_file = search_inputs
    adapters, sets = [load_adapter(d) for d in dirs], [DistilledSet.load(f) for f in proxy_files]
    stat, option = (data_aware.layer_grams, "grams") if strategy == "regmean" else (data_aware.lora_fisher, "fishers")
    out = tmp_path / strategy
    # Execute
    code = main(["merge", "--strategy", strategy, "--adapters", *dirs, "--proxy", *proxy_files, "--config", cfg_file,
                 "--out", str(out)])
    # Assert: the written adapter is the merge on each adapter's own set (paired by position), nothing searched
    assert code == 0
    expected = getattr(data_aware, strategy)(adapters, **{option: [stat(tiny_foundation, a, ds)
                                                                   for a, ds in zip(adapters, sets)]})
    merged = load_adapter(out)
    for m in MODULES:
        torch.testing.assert_close(merged.delta(m), expected.delta(m), atol=1e-5, rtol=1e-4)
    assert json.loads((out / "merge.json").read_text())["trace"] == []


@pytest.mark.parametrize("strategy", ["router", "task_route"])
def test_router_merge_writes_a_router_dir_trained_on_each_adapters_set(strategy, tmp_path, search_inputs,
                                                                       tiny_foundation, capsys):
    # Prepare
    from sim.merge import load_router
    from sim.merge.router import train_gate, train_task_router
    from sim.metrics import predict_proba

    dirs, proxy_files, cfg_file = search_inputs
    adapters, sets = [load_adapter(d) for d in dirs], [DistilledSet.load(f) for f in proxy_files]
    out = tmp_path / strategy
    # Execute
    code = main(["merge", "--strategy", strategy, "--adapters", *dirs, "--proxy", *proxy_files, "--config", cfg_file,
                 "--seed", "3", "--out", str(out)])
    # Assert: a router dir with the gate trained on the sets (seed 3), which loads and predicts as the API's
    assert code == 0 and f"{strategy} of 3 adapters" in capsys.readouterr().out
    fit = train_gate if strategy == "router" else train_task_router
    expected, got = fit(tiny_foundation, adapters, sets, seed=3), load_router(out)
    assert got.kind == strategy and len(got.adapters) == 3
    for k in ("weight", "bias"):
        torch.testing.assert_close(got.gate[k], expected.gate[k])
    ds = sets[0]
    np.testing.assert_allclose(predict_proba(tiny_foundation, got, ds.x, ds.task, ds.classes),
                               predict_proba(tiny_foundation, expected, ds.x, ds.task, ds.classes), atol=1e-6)
    assert json.loads((out / "merge.json").read_text())["record"]["n_contributors"] == 3


def _bad_cases(tmp_path, search_inputs) -> dict[str, list[str]]:
    good = [write(tmp_path, f"g{i}", make_adapter(i)) for i in range(2)]
    dirs, proxy_files, cfg_file = search_inputs
    return {
        "shape": (["--strategy", "ties", "--adapters", good[0], write(tmp_path, "s", make_adapter(5, out_f=90))],
                  "different shapes"),
        "base": (["--strategy", "svd", "--adapters", good[0], write(tmp_path, "b", make_adapter(5, base="zzz"))],
                 "different bases"),
        "modules": (["--strategy", "task_arithmetic", "--adapters", good[0],
                     write(tmp_path, "m", make_adapter(5, modules=MODULES[:1]))], "different modules"),
        "ranks": (["--strategy", "lora_avg", "--adapters", good[0], write(tmp_path, "r", make_adapter(5, r=4))],
                  "equal ranks"),
        "weights": (["--strategy", "svd", "--adapters", *good, "--weights", "1,2,3"], "needs 2 finite numbers"),
        "strategy": (["--strategy", "avg", "--adapters", *good], "unknown; known: lora_avg"),
        "missing": (["--strategy", "svd", "--adapters", good[0], str(tmp_path / "nope")], "is not a directory"),
        "not_peft": (["--strategy", "svd", "--adapters", good[0], str(tmp_path)], "is not a peft adapter dir"),
        "density": (["--strategy", "ties", "--adapters", *good, "--density", "1.5"], "merge.density must be"),
        "foundation": (["--strategy", "fusion", "--adapters", *good, "--proxy", proxy_files[0], "--config",
                        cfg_file, "--search-mode", "global"], "trained on base base0"),
        "optimizer": (["--strategy", "fusion", "--adapters", *dirs, "--proxy", *proxy_files, "--config", cfg_file,
                       "--optimizer", "Nope"], "unknown optimizer"),
        "proxy_count": (["--strategy", "mixture", "--adapters", *dirs, "--proxy", proxy_files[0], "--config",
                         cfg_file], "needs one distilled set per --adapters dir, in the same order"),
        "proxy_order": (["--strategy", "fusion", "--adapters", *dirs, "--proxy", proxy_files[1], proxy_files[0],
                         proxy_files[2], "--config", cfg_file], "give --proxy in the order of --adapters"),
        "statistic_proxy": (["--strategy", "regmean", "--adapters", *dirs, "--config", cfg_file],
                            "--strategy regmean needs --proxy: the distilled set each adapter was committed with"),
        "statistic_count": (["--strategy", "fisher", "--adapters", *dirs, "--proxy", *proxy_files[:2], "--config",
                             cfg_file], "--strategy fisher needs one distilled set per --adapters dir"),
        "router_proxy": (["--strategy", "router", "--adapters", *dirs, "--config", cfg_file],
                         "--strategy router needs --proxy: the distilled set each adapter was committed with"),
        "router_weights": (["--strategy", "task_route", "--adapters", *dirs, "--proxy", *proxy_files, "--weights",
                            "1,1,1", "--config", cfg_file], "--strategy task_route takes no --weights"),
        "router_count": (["--strategy", "router", "--adapters", *dirs, "--proxy", *proxy_files[:2], "--config",
                          cfg_file], "--strategy router needs one distilled set per --adapters dir"),
    }


@pytest.mark.parametrize("case", ["shape", "base", "modules", "ranks", "weights", "strategy", "missing", "not_peft",
                                  "density", "foundation", "optimizer", "proxy_count", "proxy_order",
                                  "statistic_proxy", "statistic_count", "router_proxy", "router_weights",
                                  "router_count"])
def test_bad_input_exits_2_and_writes_nothing(case, tmp_path, search_inputs, capsys):
    args, message = _bad_cases(tmp_path, search_inputs)[case]
    out = tmp_path / "out"
    code = main(["merge", *args, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("forgesim: error: ") and len(err.splitlines()) == 1 and message in err
    assert not out.exists()


def test_non_empty_out_is_refused(tmp_path, capsys):
    dirs = [write(tmp_path, f"a{i}", make_adapter(i)) for i in range(2)]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["merge", "--strategy", "svd", "--adapters", *dirs, "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
