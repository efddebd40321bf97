"""Apply a trained run's model.pt to images: each image's most likely classes and their probabilities, in a CSV.

Every run writes model.pt at its end (the EMA model's weights, the class names, the data set's mean, std and
image size; common.load_model reads it). Images are read as --dataset folder reads them: any format Pillow
reads, the centred square resized to the model's image size (32x32 for a CIFAR run). A folder is searched
recursively, in sorted order; every visible file in it is taken for an image, as --dataset folder does.

    python predict.py runs/fixmatch_n250_seed0 photos/ cat.jpg              # -> predictions.csv here
    python predict.py runs/fixmatch_n250_seed0/model.pt photos/ --top-k 3 --out photos.csv
    python predict.py runs/fixmatch_folder_nall_seed0 --test-dir my_data/test    # accuracy and confusion matrix

Exit status: 0 every image was predicted; 1 some files could not be read as images (each is named on stderr and
in the CSV's error column; the others are predicted); 2 bad input or an output that cannot be written (one
line on stderr). docs/predict.md has the details.
"""

import argparse
import csv
import io
import os
import sys
from collections import Counter

import torch

from common import DataError, check_device, image_files, load_model, normalize, read_image

EXIT_UNREADABLE, EXIT_BAD_INPUT = 1, 2


# ----------------------------------------------------------------------------------------------------
# Inputs: the model and the images
# ----------------------------------------------------------------------------------------------------
def model_path(target: str) -> str:
    """RUN_DIR_OR_MODEL -> the model.pt to load; DataError saying why a run folder has none."""
    if not os.path.exists(target):
        raise DataError(f"{target} not found: pass a run folder or its model.pt")
    path = os.path.join(target, "model.pt")
    if not os.path.isdir(target):
        return target
    if os.path.isfile(path):
        return path
    if os.path.exists(os.path.join(target, "diverged.json")):
        raise DataError(f"{target} has no model.pt: the run diverged (diverged.json), so it has no trained model")
    if os.path.exists(os.path.join(target, "results.json")):
        raise DataError(f"{target} has no model.pt: the run finished before runs wrote one; delete its results.json "
                        "and rerun its command, which resumes from checkpoint.pt and writes model.pt")
    if os.path.exists(os.path.join(target, "args.json")):
        raise DataError(f"{target} has no model.pt: the run has not finished (model.pt is written at the end)")
    raise DataError(f"{target} is not a run folder (no model.pt, no args.json)")


def find_images(paths: list[str], outputs: list[str]) -> list[str]:
    """The PATH arguments -> image files: a file as given, a folder's visible files (subfolders included, sorted,
    depth first). The outputs of an earlier call (a CSV inside a searched folder) are not images. DataError for a
    path that does not exist or a folder with no files."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            files = [f for f in image_files(path) if os.path.abspath(f) not in outputs]
            if not files:
                raise DataError(f"{path} holds no images")
            found += files
        elif os.path.exists(path):
            found.append(path)
        else:
            raise DataError(f"{path} not found")
    return found


def find_test_images(test_dir: str, classes: list[str], outputs: list[str]) -> tuple[list[str], list[int]]:
    """--test-dir's <class>/ folders -> image files and their labels (the class's index in the model's classes).
    The folders must be named as the model's classes (some may be missing); DataError naming those that are not."""
    if not os.path.isdir(test_dir):
        raise DataError(f"--test-dir {test_dir} is not a folder")
    names = sorted(n for n in os.listdir(test_dir) if not n.startswith("."))
    stray = [n for n in names if not os.path.isdir(os.path.join(test_dir, n))]
    if stray:
        raise DataError(f"{os.path.join(test_dir, stray[0])} is not in a class folder: --test-dir holds one folder "
                        "of images per class, named as the model's classes")
    unknown = [n for n in names if n not in classes]
    if unknown:
        shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
        raise DataError(f"--test-dir {test_dir} has folders that are not the model's classes: {', '.join(unknown)} "
                        f"(its classes: {shown})")
    paths, labels = [], []
    for name in names:
        files = [f for f in image_files(os.path.join(test_dir, name)) if os.path.abspath(f) not in outputs]
        paths, labels = paths + files, labels + [classes.index(name)] * len(files)
    if not paths:
        raise DataError(f"--test-dir {test_dir} holds no images")
    return paths, labels


# ----------------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: torch.nn.Module, meta: dict, paths: list[str], device: torch.device,
            batch_size: int) -> tuple[torch.Tensor, list[str]]:
    """The logits [N, C] of every image (NaN for a file that cannot be read), on the CPU, and the read errors
    ("" where the image was read; each is printed to stderr as it happens). Images are read batch by batch, so
    memory holds one batch whatever the number of files."""
    logits = torch.full((len(paths), meta["architecture"]["num_classes"]), float("nan"))
    errors = [""] * len(paths)
    for start in range(0, len(paths), batch_size):
        images, rows = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                images.append(read_image(paths[i], meta["image_size"]))
                rows.append(i)
            except DataError as e:  # one bad file does not stop the others
                errors[i] = str(e)
                print(f"error: {e}", file=sys.stderr)
        if images:
            logits[rows] = classify(model, torch.stack(images).to(device), meta)
    return logits, errors


def classify(model: torch.nn.Module, x: torch.Tensor, meta: dict) -> torch.Tensor:
    """Logits (float32, on the CPU) of uint8 images [B, 3, H, W], computed as the training scripts' evaluate does
    (normalize with the data set's mean and std, channels_last, bf16 autocast on CUDA), so that the predictions
    are the test accuracy's."""
    x = normalize(x, meta["mean"], meta["std"]).contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        return model(x).float().cpu()


# ----------------------------------------------------------------------------------------------------
# Outputs: the CSV, the summary, the test report
# ----------------------------------------------------------------------------------------------------
def write_csv(path: str, paths: list[str], logits: torch.Tensor, errors: list[str], classes: list[str], k: int,
              labels: list[int] | None = None) -> None:
    """One row per image: path, (with --test-dir, its true label), the predicted class and its probability, the
    top-k classes and probabilities, and the error for a file that could not be read (its other cells empty).
    Written atomically: a failed write leaves no half CSV."""
    probs = logits.softmax(1).tolist()
    top = logits.topk(k, dim=1).indices.tolist()  # ranked by logit: probabilities can tie where logits do not
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path"] + (["label"] if labels is not None else []) + ["class", "prob"]
                    + [f"top{j}_{field}" for j in range(1, k + 1) for field in ("class", "prob")] + ["error"])
    for i, image in enumerate(paths):
        ranked = [] if errors[i] else [(classes[c], f"{probs[i][c]:.4f}") for c in top[i]]
        cells = [cell for pair in ranked for cell in pair] or [""] * (2 * k)
        label = [classes[labels[i]]] if labels is not None else []
        writer.writerow([image] + label + cells[:2] + cells + [errors[i]])
    write_atomic(path, buffer.getvalue().encode())


def write_atomic(path: str, data: bytes) -> None:
    """Write a file whole or not at all (a crash or a full disk leaves no half file behind)."""
    try:
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    except BaseException as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        if isinstance(e, OSError):
            e.filename = path  # the file the user asked for, not its temporary name
        raise


def describe(meta: dict, device: torch.device) -> str:
    """One line about the model: where it came from and how good it was on its test set."""
    arch, size = meta["architecture"], meta["image_size"]
    return (f"{meta['algorithm']} model, WRN-{arch['depth']}-{arch['widen_factor']}, {arch['num_classes']} classes, "
            f"{size}x{size} images; test top-1 at the end of training {100 * meta['final_top1']:.2f}%; on {device}")


def summarize(predicted: list[str], n_failed: int, out: str) -> str:
    """How many images went to which class (the 10 most frequent), how many failed, where the CSV is."""
    counts = Counter(predicted).most_common()
    shown = ", ".join(f"{c} {n}" for c, n in counts[:10]) + (", ..." if len(counts) > 10 else "") or "none"
    failed = f"; {n_failed} could not be read (error column)" if n_failed else ""
    return f"{len(predicted)} images predicted: {shown}{failed} -> {out}"


def accuracy_report(labels: list[int], predicted: list[int], classes: list[str]) -> str:
    """Accuracy over the readable images and per class (the classes --test-dir holds), as printed."""
    correct = [y == p for y, p in zip(labels, predicted)]
    lines = [f"accuracy {100 * sum(correct) / len(correct):.2f}% ({sum(correct)}/{len(correct)} images)",
             "per class:"]
    width = max(len(c) for c in classes)
    for c in sorted(set(labels)):
        hits = [ok for y, ok in zip(labels, correct) if y == c]
        lines.append(f"  {classes[c]:<{width}}  {100 * sum(hits) / len(hits):6.2f}%  ({sum(hits)}/{len(hits)})")
    return "\n".join(lines)


def confusion_matrix(labels: list[int], predicted: list[int], num_classes: int) -> torch.Tensor:
    """counts[true class, predicted class]."""
    counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    counts.index_put_((torch.tensor(labels), torch.tensor(predicted)), torch.tensor(1), accumulate=True)
    return counts


def plot_confusion(counts: torch.Tensor, classes: list[str], path: str) -> None:
    """The confusion matrix as a PNG: rows are true classes (those --test-dir holds), columns predicted ones,
    colour the fraction of the row, and the counts written in the cells when there are few classes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [c for c in range(len(classes)) if counts[c].sum() > 0]
    shown = counts[rows].float()
    fractions = shown / shown.sum(1, keepdim=True)
    size = min(4 + 0.4 * len(classes), 40)
    fig, ax = plt.subplots(figsize=(size, min(2 + 0.4 * len(rows), 40) + 1.5))
    image = ax.imshow(fractions.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    if len(classes) <= 30:
        for r in range(len(rows)):
            for c in range(len(classes)):
                if shown[r, c] > 0:
                    ax.text(c, r, int(shown[r, c]), ha="center", va="center", fontsize=8,
                            color="white" if fractions[r, c] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(rows)), [classes[c] for c in rows])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix, {int(counts.sum())} images", fontsize=10)
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="RUN_DIR_OR_MODEL", help="a run folder (its model.pt is used) or a model.pt")
    p.add_argument("paths", metavar="PATH", nargs="*", help="image files and folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="classes per image in the CSV, most likely first (default: 5, or all if the model has fewer)")
    p.add_argument("--out", default="predictions.csv", metavar="FILE",
                   help="the CSV written (default: predictions.csv in the current folder; replaced if it exists); "
                   "with --test-dir the confusion matrix goes beside it, as <out without .csv>_confusion.png")
    p.add_argument("--test-dir", default=None, metavar="DIR",
                   help="instead of PATHs: a folder of <class>/ folders named as the model's classes; prints the "
                   "accuracy and per-class accuracy, writes the confusion matrix, and the CSV gets a label column")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when available); bf16 autocast on CUDA, as in evaluation")
    p.add_argument("--batch-size", type=int, default=256, metavar="N",
                   help="images read and classified at a time (default: 256)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings that cannot work, with one line (DataError), before anything is loaded."""
    if not args.paths and args.test_dir is None:
        raise DataError("nothing to predict: pass image files or folders after the run folder, or --test-dir DIR")
    if args.paths and args.test_dir is not None:
        raise DataError("pass image files and folders, or --test-dir, not both")
    if args.top_k is not None and args.top_k < 1:
        raise DataError(f"--top-k must be >= 1, got {args.top_k}")
    if args.batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_device(args.device)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    device = torch.device(args.device)
    model, meta = load_model(model_path(args.model), device)
    model = model.to(memory_format=torch.channels_last)  # as in training: the same arithmetic as its evaluation
    classes = meta["classes"]
    k = min(5, len(classes)) if args.top_k is None else args.top_k
    if k > len(classes):
        raise DataError(f"--top-k must be at most {len(classes)}, the model's number of classes; got {k}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):  # found now, not after the images are classified
        raise DataError(f"cannot write --out {args.out}: the folder {folder} does not exist")
    confusion_path = os.path.splitext(args.out)[0] + "_confusion.png"
    outputs = [os.path.abspath(p) for p in (args.out, confusion_path)]
    if args.test_dir is None:
        paths, labels = find_images(args.paths, outputs), None
    else:
        paths, labels = find_test_images(args.test_dir, classes, outputs)
    print(describe(meta, device))
    logits, errors = predict(model, meta, paths, device, args.batch_size)
    write_csv(args.out, paths, logits, errors, classes, k, labels)
    read = [i for i, e in enumerate(errors) if not e]
    predicted = logits[read].argmax(1).tolist()
    print(summarize([classes[c] for c in predicted], len(paths) - len(read), args.out))
    if labels is not None and read:
        truth = [labels[i] for i in read]
        print(accuracy_report(truth, predicted, classes))
        plot_confusion(confusion_matrix(truth, predicted, len(classes)), classes, confusion_path)
        print(f"confusion matrix -> {confusion_path}")
    return EXIT_UNREADABLE if len(read) < len(paths) else 0


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 every image predicted, 1 some could not be read, 2 bad input or an unwritable output."""
    args = parse_args(argv)
    try:
        return run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
    except OSError as e:  # writing the CSV or the PNG (a full disk, a permission), listing a folder
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
