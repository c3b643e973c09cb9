"""Real-data check of the low-level visual cue (fcm.py, paper eqs 1, 3-12) on CamVid.

Segments every image of a CamVid split on its feature grid (image / 8, i.e. 60 x 45 for 480 x 360)
into K = 11 clusters with
  (a) the low-level branch: spatial FCM + colour affinity, argmax of F_l (eq 12), with the affinity over
      all pixel pairs (global, eqs 9-11 as printed) and over windows of neighbours (local, --radii),
  (b) plain FCM: no spatial term (eqs 5-6 skipped), no affinity, argmax of P,
  (c) plain k-means on colour (a tiny torch k-means below),
plus two ablations (spatial FCM without affinity; plain FCM with affinity), upsamples each
prediction (nearest) to the label size, scores it per image with Hungarian matching of clusters to
classes (pixel accuracy, mIoU over the classes present in the label; void = id 11 ignored) and
prints the mean scores. Writes nothing.

    python scripts/camvid_lowlevel.py [--root ../shared/data/camvid] [--split val] [--limit N]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import fcm  # noqa: E402

N_CLASSES = 11          # Sky, Building, Pole, Road, Pavement, Tree, SignSymbol, Fence, Car, Pedestrian, Bicyclist
VOID = 11               # "Unlabelled" -> ignored


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data/camvid",
                        help="CamVid folder in the SegNet layout (relative paths are taken from the repo root)")
    parser.add_argument("--split", default="val", help="split folder: images in <split>/, labels in <split>annot/")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images (sorted by name)")
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    parser.add_argument("--patch", type=int, default=8, help="feature grid = image size // patch")
    parser.add_argument("--m", type=float, default=2.0, help="FCM fuzzifier m")
    parser.add_argument("--sigma", type=float, default=0.1, help="colour affinity sigma (eq 10)")
    parser.add_argument("--max-iter", type=int, default=20, help="FCM / k-means iteration cap")
    parser.add_argument("--radii", default="1,3,5,10",
                        help="window radii of the local reading of eqs (9)-(12) to compare (comma-separated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def list_pairs(root, split, limit):
    """Sorted (image path, label path) pairs of <root>/<split>/*.png and <root>/<split>annot/*.png."""
    image_dir, label_dir = root / split, root / f"{split}annot"
    if not image_dir.is_dir() or not label_dir.is_dir():
        raise SystemExit(f"error: expected CamVid folders {image_dir} and {label_dir}")
    images = sorted(image_dir.glob("*.png"))
    if limit is not None:
        images = images[:limit]
    if not images:
        raise SystemExit(f"error: no .png images in {image_dir}")
    pairs = []
    for image in images:
        label = label_dir / image.name
        if not label.is_file():
            raise SystemExit(f"error: missing label {label} for image {image}")
        pairs.append((image, label))
    return pairs


def load_pair(image_path, label_path):
    """-> image float (3, H, W) in [0, 1], label long (H, W) with void = -1."""
    image = torch.from_numpy(np.array(Image.open(image_path).convert("RGB"))).permute(2, 0, 1).float() / 255
    label = torch.from_numpy(np.array(Image.open(label_path))).long()
    if label.dim() != 2 or label.shape != image.shape[1:]:
        raise SystemExit(f"error: label {label_path} has shape {tuple(label.shape)}, image is {tuple(image.shape[1:])}")
    label[label == VOID] = -1
    if (label >= N_CLASSES).any():
        raise SystemExit(f"error: label {label_path} has ids above {VOID}")
    return image, label


def kmeans_colour(x, k, iterations, seed):
    """Plain (Lloyd) k-means on the pixel colours of x (B, C, h, w) -> hard labels (B, h, w).

    Centres start at k random pixels (torch.Generator seeded per call)."""
    B, C, h, w = x.shape
    points = x.flatten(2).transpose(1, 2)                                      # (B, N, C)
    generator = torch.Generator().manual_seed(seed)
    start = torch.stack([torch.randperm(h * w, generator=generator)[:k] for _ in range(B)]).to(x.device)
    centres = points.gather(1, start[:, :, None].expand(B, k, C))             # (B, k, C)
    for _ in range(iterations):
        labels = torch.cdist(points, centres).argmin(dim=2)                   # (B, N)
        one_hot = F.one_hot(labels, k).to(points.dtype)                        # (B, N, k)
        counts = one_hot.sum(dim=1)[:, :, None]                                # (B, k, 1)
        sums = torch.bmm(one_hot.transpose(1, 2), points)                      # (B, k, C)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)  # empty cluster stays put
    return torch.cdist(points, centres).argmin(dim=2).reshape(B, h, w)


def score(prediction, label, n_clusters):
    """Per-image Hungarian-matched pixel accuracy and mIoU (classes present in the label)."""
    valid = label >= 0
    pred, true = prediction[valid].numpy(), label[valid].numpy()
    confusion = np.zeros((n_clusters, N_CLASSES), dtype=np.int64)              # (cluster, class)
    np.add.at(confusion, (pred, true), 1)
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    matched = np.zeros((N_CLASSES, N_CLASSES), dtype=np.int64)                 # (class predicted, class true)
    matched[cols] = confusion[rows]
    true_positive = np.diag(matched)
    accuracy = true_positive.sum() / max(1, confusion.sum())
    present = matched.sum(axis=0) > 0
    union = matched.sum(axis=0) + matched.sum(axis=1) - true_positive
    miou = (true_positive[present] / union[present]).mean()
    return accuracy, miou


def main():
    args = parse_args()
    root = Path(args.root)
    if not root.is_absolute():
        root = (REPO_ROOT / root).resolve()
    pairs = list_pairs(root, args.split, args.limit)
    device = torch.device(args.device)
    K = N_CLASSES
    common = dict(m=args.m, max_iter=args.max_iter, seed=args.seed, patch=args.patch)
    methods = {
        "(a) spatial FCM + global affinity": lambda im: fcm.low_level_cue(im, K, sigma=args.sigma, affinity="global", **common),
        **{f"    spatial FCM + local affinity r={r}":
           (lambda im, r=r: fcm.low_level_cue(im, K, sigma=args.sigma, affinity="local", radius=r, **common))
           for r in map(int, args.radii.split(","))},
        "(b) plain FCM (P)": lambda im: fcm.low_level_cue(im, K, spatial=False, affinity="none", **common),
        "(c) k-means on colour": None,
        "    spatial FCM, no affinity (P)": lambda im: fcm.low_level_cue(im, K, affinity="none", **common),
        "    plain FCM + affinity": lambda im: fcm.low_level_cue(im, K, sigma=args.sigma, spatial=False, affinity="global", **common),
    }
    results = {name: [] for name in methods}
    seconds = {name: 0.0 for name in methods}
    for start in range(0, len(pairs), args.batch):
        loaded = [load_pair(*pair) for pair in pairs[start:start + args.batch]]
        if len({image.shape for image, _ in loaded}) != 1:
            raise SystemExit("error: images of one batch differ in size; use --batch 1")
        images = torch.stack([image for image, _ in loaded]).to(device)          # (B, 3, H, W)
        for name, method in methods.items():
            tic = time.perf_counter()
            if method is None:
                x = fcm.downsample(images, args.patch)                           # same grid as FCM
                labels = kmeans_colour(x, K, args.max_iter, args.seed)           # (B, h, w)
            else:
                labels = method(images).argmax(dim=1)                            # (B, h, w)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - tic
            for index, (_, label) in enumerate(loaded):
                upsampled = F.interpolate(labels[index][None, None].float(), size=tuple(label.shape),
                                          mode="nearest")[0, 0].long().cpu()     # (H, W)
                results[name].append(score(upsampled, label, K))
    print(f"CamVid {args.split}: {len(pairs)} images, K = {K}, grid = image / {args.patch}, m = {args.m}, "
          f"sigma = {args.sigma}, max_iter = {args.max_iter}; per-image Hungarian matching, void ignored")
    print(f"{'method':36s} {'pixel acc':>9s} {'mIoU':>7s} {'ms/image':>9s}")
    for name in methods:
        accuracy, miou = np.mean(np.array(results[name]), axis=0)
        print(f"{name:36s} {100 * accuracy:9.2f} {100 * miou:7.2f} {1000 * seconds[name] / len(pairs):9.1f}")


if __name__ == "__main__":
    main()
