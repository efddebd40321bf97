"""Draw what the training scripts' augmentations do to real CIFAR-10 images: docs/augmentations.png.

One row per image: the original, two weak views (flip + translate) and two strong views (weak +
RandAugment + Cutout), all from common.py exactly as training calls them. Under each strong view are
the two RandAugment ops and values it drew, so a reader can check an op does what its name says.

    python tools/show_augmentations.py [--data-dir ../shared/cifar10] [--out docs/augmentations.png]
"""

import argparse
import os
import pickle
import sys

import matplotlib

matplotlib.use("Agg")  # a file, never a window: the tool also runs on headless machines
import matplotlib.pyplot as plt
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # common.py lives in the repository root, one level up
import common  # noqa: E402


def class_names(data_dir: str) -> list[str]:
    """CIFAR-10's class names from batches.meta, or "class k" when the file is absent."""
    try:
        with open(os.path.join(data_dir, "cifar-10-batches-py", "batches.meta"), "rb") as f:
            return [n.decode() for n in pickle.load(f, encoding="bytes")[b"label_names"]]
    except (OSError, pickle.UnpicklingError, KeyError):
        return [f"class {k}" for k in range(common.NUM_CLASSES)]


def describe(name: str, v: float) -> str:
    """An op and its value as Pillow receives it (Posterize/Solarize floor theirs)."""
    if name in ("Identity", "AutoContrast", "Equalize"):
        return name
    if name == "Posterize":
        return f"Posterize {int(v)} bits"
    if name == "Solarize":
        return f"Solarize T={int(v)}"
    if name == "Rotate":
        return f"Rotate {v:+.0f}°"
    return f"{name} {v:+.2f}" if name.startswith(("Shear", "Translate")) else f"{name} {v:.2f}"


def strong_with_ops(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, list[str] | None]:
    """common.strong_augment(x, generator), plus a caption per image naming the ops it drew.

    The ops are recovered by replaying the generator the way strong_augment consumes it (weak's flip and
    shift, then per round an op and a uniform per image, then the Cutout centre) and re-applying them
    image by image; if that does not reproduce strong_augment's output, the captions would lie, so
    there are none.
    """
    replay = torch.Generator()
    replay.set_state(generator.get_state())
    out = common.strong_augment(x, generator)
    y, captions = common.weak_augment(x, replay), [[] for _ in range(len(x))]
    for _ in range(2):
        op = torch.randint(0, len(common.OP_NAMES), (len(x),), generator=replay)
        u = torch.rand(len(x), generator=replay, dtype=torch.float64)
        for i in range(len(x)):
            name = common.OP_NAMES[op[i]]
            _, _, lo, hi = common.RANDAUGMENT_OPS[name]
            v = lo + (hi - lo) * u[i]
            y[i:i + 1] = common.apply_op(name, y[i:i + 1], v)
            captions[i].append(describe(name, float(v)))
    centre = torch.randint(0, x.shape[2], (2, len(x)), generator=replay)
    if not torch.equal(common.cutout(y, centre[0], centre[1]), out):
        print("warning: could not replay strong_augment's draws; strong views drawn without op names")
        return out, None
    return out, ["\n".join(c) for c in captions]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "cifar10"),
                   help="folder holding cifar-10-batches-py/ (default: ../shared/cifar10 beside the repository)")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "augmentations.png"), help="PNG to write")
    p.add_argument("--n-images", type=int, default=8, help="rows: training images shown")
    p.add_argument("--seed", type=int, default=0, help="picks the images and their augmentations")
    args = p.parse_args()

    try:
        data = common.load_cifar10(args.data_dir)
    except common.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(data["train_x"]), generator=g)[: args.n_images]
    x, names = data["train_x"][idx], class_names(args.data_dir)

    views = [("original", x, None)]
    views += [(f"weak {k}", common.weak_augment(x, g), None) for k in (1, 2)]
    views += [(f"strong {k}", *strong_with_ops(x, g)) for k in (1, 2)]

    rows, cols = len(x), len(views)
    fig, axes = plt.subplots(rows, cols, figsize=(1.25 * cols, 1.45 * rows), squeeze=False)
    for c, (title, imgs, captions) in enumerate(views):
        for r in range(rows):
            ax = axes[r, c]
            ax.imshow(imgs[r].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{names[data['train_y'][idx[r]]]}\n#{int(idx[r])}", fontsize=7)
            if captions:
                ax.set_xlabel(captions[r], fontsize=5.5, labelpad=2)
    fig.suptitle("Weak: flip + shift <= 4 px.   Strong: weak + 2 RandAugment ops + 16 px Cutout", fontsize=8)
    fig.tight_layout(h_pad=0.3, w_pad=0.2)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
