"""Train the CPU-scale base model on the real CIFAR-10: VGG-16 with batch-norm at width 0.25.

Checkpoints every epoch under ``benchmarks/cifar10_base_val/``; run the same command again to resume
(the long run can be split across sessions). The final weights are ``model.pt`` there, the
per-epoch log ``history.json``. 10 % of the training images (stratified, seed 0) are held out as the
validation split every later choice is made on. ``benchmarks/cifar10_base/`` holds the earlier model
trained on all 50,000 images (``--val-fraction 0 --out benchmarks/cifar10_base``), kept because
results recorded before the validation split used it.

    python benchmarks/train_cifar10_base.py --data-dir ../shared/data/cifar10 --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from compress.data import DataConfig
from compress.jobs import train
from compress.models import ModelConfig
from compress.system import environment
from compress.training import TrainConfig, evaluate

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(HERE.parents[1] / "shared" / "data" / "cifar10"))
    p.add_argument("--out", default=str(HERE / "cifar10_base_val"))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="training images held out for validation (benchmarks/cifar10_base/ used 0)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ModelConfig("vgg16", {"width": 0.25, "batch_norm": True})
    data = DataConfig(f"imagefolder:{args.data_dir}", val_fraction=args.val_fraction)
    cfg = TrainConfig(epochs=args.epochs, batch_size=100, lr=args.lr, momentum=0.9, weight_decay=5e-4,
                      schedule="onecycle", augment=True, seed=0)
    print("environment:", environment())
    t0 = time.perf_counter()
    trained, history, bundle = train(model, data, cfg, args.out, progress=False)
    val = f"validation accuracy {history[-1]['val_acc']:.4f}; " if "val_acc" in history[-1] else ""
    print(f"finished {len(history)} epochs; {val}test accuracy {evaluate(trained, bundle):.4f}; "
          f"this invocation {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
