#!/usr/bin/env bash
# The second paper's CIFAR-K experiment at CPU scale on the real CIFAR-10 (K = 3, 6, 8, 10):
# five draws of labels per K (the second paper averages 5), a VGG-16 (batch-norm, width 0.25) per K and draw, trained on a fixed 5,000-image subset of the K labels'
# training images for 10 epochs (one-cycle), analysed with 30-epoch probes on all 5 taps.
# Output: runs/cifar-k/ (ignored by git); the printed table goes to benchmarks/results/cifar_k.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data/cifar10}"
OMP_NUM_THREADS="${THREADS:-1}" .venv/bin/compress cifar-k --model vgg16 --width 0.25 \
    --data "imagefolder:$DATA" --ks 3 6 8 10 --draws 5 --limit-train 5000 \
    --epochs 10 --lr 0.05 --momentum 0.9 --weight-decay 5e-4 --schedule onecycle \
    --probe-epochs 30 --feature-dtype float16 --out runs/cifar-k --quiet
