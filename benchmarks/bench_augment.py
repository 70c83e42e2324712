"""Cost of one epoch's augmentation: crop + flip, the random rotation, and torchvision per image.

labkit augments the whole training set at the start of each epoch, on the device
(:func:`labkit.data.augment` for the crop and flip, :func:`labkit.data.random_rotate` for the
rotation of Sato & Iiduka's CIFAR-100 recipe). This script times both on N uint8 CIFAR-sized
images in the same run, and, for scale, torchvision's ``RandomRotation(15)`` applied image by
image to tensors (what a ``Dataset`` transform does, without worker processes), on at most
``--per-image`` images, scaled to N.

    python benchmarks/bench_augment.py                  # the device picked like labkit does
    python benchmarks/bench_augment.py --n 50000 --repeats 5

Prints seconds per epoch of each and the ratios rotation / (crop + flip) and
(crop + flip + rotation) / (crop + flip).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch


def _best_time(fn, repeats: int, device: torch.device) -> float:
    """The fastest of ``repeats`` timed calls (after one warm-up call), seconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure(n: int, repeats: int, per_image: int, device: torch.device) -> dict[str, Any]:
    from torchvision.transforms import v2

    from labkit import data as lk_data

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device,
                      generator=gen)
    crop_flip = _best_time(lambda: lk_data.augment(x, gen), repeats, device)
    rotation = _best_time(lambda: lk_data.random_rotate(x, gen, 15.0), repeats, device)
    both = _best_time(lambda: lk_data.random_rotate(lk_data.augment(x, gen), gen, 15.0),
                      repeats, device)
    k = min(per_image, n)
    transform = v2.RandomRotation(15)
    sample = x[:k]
    per_image_s = _best_time(lambda: [transform(img) for img in sample], 1, device) * n / k
    return {
        "device": str(device), "n": n, "crop_flip_s": crop_flip, "rotation_s": rotation,
        "crop_flip_rotation_s": both, "torchvision_per_image_rotation_s": per_image_s,
        "rotation_over_crop_flip": rotation / crop_flip,
        "all_over_crop_flip": both / crop_flip,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50_000, help="images per epoch (CIFAR: 50,000)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls; the best is kept")
    p.add_argument("--per-image", type=int, default=2000,
                   help="images rotated one by one by torchvision (scaled to --n)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.repeats, args.per_image = 512, 1, 64
    from labkit.train import resolve_device

    row = measure(args.n, args.repeats, args.per_image, resolve_device(args.device))
    print(f"device {row['device']}  {row['n']} images of 3 x 32 x 32 (uint8), one epoch:")
    print(f"  crop + flip (labkit.data.augment)           {row['crop_flip_s']:8.4f} s")
    print(f"  rotation (labkit.data.random_rotate)        {row['rotation_s']:8.4f} s")
    print(f"  crop + flip + rotation                      {row['crop_flip_rotation_s']:8.4f} s")
    print(f"  torchvision RandomRotation, image by image  "
          f"{row['torchvision_per_image_rotation_s']:8.4f} s")
    print(f"  ratio rotation / (crop + flip): {row['rotation_over_crop_flip']:.2f}x; "
          f"all / (crop + flip): {row['all_over_crop_flip']:.2f}x")
    print(json.dumps(row, sort_keys=True))
    return row


if __name__ == "__main__":
    main()
