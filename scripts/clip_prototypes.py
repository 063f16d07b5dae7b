"""Write CLIP text embeddings of a run's class names as a ``model.prototypes`` file (needs open_clip).

    .venv/bin/python scripts/clip_prototypes.py --out protos.safetensors [--config run.yaml] [--set data.n_tasks=3]
        [--model ViT-B-16 --pretrained openai] [--template "a {task} image showing {name}"]
        [--classes xray=normal,pneumonia,effusion ...]

The tasks and their classes (in label order) are the run's, from the same config layering as ``forgesim``
(defaults < --config < --set), or given with ``--classes TASK=NAME,NAME,...``; each class becomes one prompt
(``--template`` with ``{task}`` and ``{name}``, underscores read as spaces), encoded by open_clip's text tower and
L2-normalised. The file holds one (n_classes, dim) tensor per task, named by the task, with the class names in its
metadata so forgesim checks the order. Then:

    forgesim run --set model.name=vit_base_patch16_clip_224.openai --set model.pretrained=hub \\
        --set model.keep_head=true --set model.prototypes=protos.safetensors ...

``model.keep_head=true`` keeps the image tower's projection, so the features live in the same 512-d space as the
text embeddings (timm's ``vit_base_patch16_clip_224.openai`` is open_clip's ``ViT-B-16`` / ``openai``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, metavar="FILE", help="the .safetensors file to write")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name (default ViT-B-16)")
    p.add_argument("--pretrained", default="openai", help="open_clip pretrained tag (default openai)")
    p.add_argument("--template", default="a {task} image showing {name}",
                   help="prompt per class, with {task} and {name} (default: %(default)r)")
    p.add_argument("--classes", action="append", default=[], metavar="TASK=NAME,NAME,...",
                   help="a task's class names in label order (repeatable); default: the run config's tasks")
    p.add_argument("--config", metavar="FILE", help="forgesim config whose tasks are embedded")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config override, as in forgesim (repeatable)")
    return p.parse_args(argv)


def task_classes(args: argparse.Namespace) -> dict[str, tuple[str, ...]]:
    """task → class names: from --classes, else from the run config's cohort."""
    if args.classes:
        out = {}
        for item in args.classes:
            task, sep, names = item.partition("=")
            if not sep or not task or not names:
                raise SystemExit(f"clip_prototypes: --classes {item!r} must look like TASK=NAME,NAME,...")
            out[task] = tuple(n.strip() for n in names.split(",") if n.strip())
        return out
    from sim.config import SimConfig, apply_overrides, load_config
    from sim.data import build_cohort

    cfg = apply_overrides(load_config(args.config) if args.config else SimConfig(), args.overrides)
    return dict(build_cohort(cfg.data, cfg.seed).task_classes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import open_clip
    except ImportError:
        print("clip_prototypes: needs open_clip (pip install open_clip_torch); it is not installed", file=sys.stderr)
        return 2
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    tasks = task_classes(args)
    model, _, _ = open_clip.create_model_and_transforms(args.model, pretrained=args.pretrained)
    tokenizer = open_clip.get_tokenizer(args.model)
    model.eval()
    tables = {}
    for task, classes in tasks.items():
        prompts = [args.template.format(task=task.replace("_", " "), name=c.replace("_", " ")) for c in classes]
        with torch.no_grad():
            tables[task] = F.normalize(model.encode_text(tokenizer(prompts)).float(), dim=-1).contiguous()  # (K, D)
        print(f"{task}: {len(classes)} classes, dim {tables[task].shape[1]}: {prompts[0]!r} ...")
    meta = {task: json.dumps(list(classes)) for task, classes in tasks.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tables, args.out, metadata=meta)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
