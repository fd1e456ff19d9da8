"""The deployment commands ``export``, ``bench`` and ``predict``: thin wrappers around
:mod:`compress.deploy.export`, :mod:`compress.deploy.bench` and :mod:`compress.deploy.predict`."""

from __future__ import annotations

import argparse
from pathlib import Path

from compress.errors import UserError, printable, shorten

__all__ = ["add_commands"]

# flag -> (smallest, largest) of the integer flags of these commands
_INT_RANGES = {"labels": (1, 100_000), "image_size": (1, 4096), "limit_test": (1, None), "verify_samples": (1, None),
               "threads": (1, 1024), "warmup": (0, None), "repeats": (1, None), "top_k": (1, None)}


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse out-of-range values of the hand-written flags before any file is read."""
    import math

    for dest, (low, high) in _INT_RANGES.items():
        value = getattr(args, dest, None)
        if value is not None and (value < low or high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise UserError(f"--{dest.replace('_', '-')} {value}: must be {span}")
    for b in getattr(args, "batch_sizes", None) or []:
        if not 1 <= b <= 65_536:
            raise UserError(f"--batch-sizes {b}: every batch size must be from 1 to 65536")
    tol = getattr(args, "tol", None)
    if tol is not None and not (math.isfinite(tol) and tol > 0):
        raise UserError(f"--tol {tol}: must be a positive finite number, e.g. 1e-3")


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (default: the dataset recorded in the model)")
    g.add_argument("--data", default=None, help="digits, cifar10, cifar100 or imagefolder:<path>")
    g.add_argument("--data-root", default=None, help="folder of the torchvision CIFAR files")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR into --data-root")
    g.add_argument("--labels", type=int, default=None, metavar="K", help="nested subset of K labels (CIFAR-K)")
    g.add_argument("--image-size", type=int, default=None, help="resize image-folder images to this size")
    g.add_argument("--limit-test", type=int, default=None, help="use a random subset of N test images")


def _test_data(args: argparse.Namespace, meta: dict):
    from compress.deploy.export import load_test_data

    return load_test_data(meta, args.data, root=args.data_root, download=args.download, num_labels=args.labels,
                          image_size=args.image_size, limit_test=args.limit_test)


def _cmd_export(args: argparse.Namespace) -> None:
    from compress.deploy.bench import count_flops, count_params
    from compress.deploy.export import export_and_verify
    from compress.compression.serialize import load_model

    _check_flags(args)
    if str(args.model).lower().endswith(".onnx"):
        raise UserError(f"{shorten(args.model)} is already an ONNX file; export takes a model file or checkpoint")
    out = Path(args.out) if args.out else Path(args.model).with_suffix(".onnx")
    if out.is_dir():
        raise UserError(f"--out {shorten(str(out))} is a folder; give the ONNX file to write, e.g. model.onnx")
    if out.exists() and Path(args.model).exists() and out.resolve() == Path(args.model).resolve():
        raise UserError(f"--out {shorten(str(out))} is the model file itself; give another file, e.g. model.onnx")
    model, meta = load_model(args.model)
    bundle = _test_data(args, meta)
    extra = {"params": count_params(model), "flops": count_flops(model, meta["input_size"])}
    r = export_and_verify(model, meta, out, bundle, opset=args.opset, tol=args.tol, max_samples=args.verify_samples,
                          extra_meta=extra, what=f"model file {str(args.model)!r}")
    print(f"wrote {r['path']} ({r['file_size'] / 1024:.1f} KiB, opset {r['opset']}, dynamic batch axis)")
    print(f"onnxruntime against PyTorch on {r['samples']} test images: max |diff| {r['max_abs_diff']:.2e} "
          f"(tolerance {r['tolerance']:g}), argmax agreement {r['argmax_agreement']:.2%}")


def _cmd_bench(args: argparse.Namespace) -> None:
    from compress.deploy.bench import read_model_file_meta, run_bench
    from compress.io import run_folder_lock
    from compress.reports.bench import primary_backend, summary_rows, write_bench_report

    _check_flags(args)
    bundle = _test_data(args, read_model_file_meta(args.models[0]))
    with run_folder_lock(args.out):
        result = run_bench(args.models, bundle, args.out, names=args.names, batch_sizes=args.batch_sizes,
                           warmup=args.warmup, repeats=args.repeats, backends=args.backends, threads=args.threads,
                           tol=args.tol)
        write_bench_report(result, args.out)
    header, rows, ratio_header, ratios = summary_rows(result)
    print(f"latency: {primary_backend(result)}, median of {args.repeats} interleaved repeats")
    for table in ((header, rows), (["ratio to original", *ratio_header[1:]], ratios)):
        widths = [max(len(str(r[i])) for r in [table[0], *table[1]]) + 2 for i in range(len(table[0]))]
        for r in [table[0], *table[1]]:
            print("".join(f"{str(v):<{w}}" for v, w in zip(r, widths)).rstrip())
        print()
    print(f"report: {Path(args.out) / 'bench.html'}")


def _cmd_predict(args: argparse.Namespace) -> None:
    from compress.deploy.predict import predict_images

    _check_flags(args)
    if Path(args.model).suffix.lower() in (".pt", ".pth", ".safetensors", ".ckpt"):
        raise UserError(f"predict runs an ONNX file; export {shorten(args.model)} first with `compress export`")
    for r in predict_images(args.model, args.images, top_k=args.top_k, device=args.device):
        # names come from the file: control characters are escaped, never sent to the terminal
        print(f"{printable(r['file'])}: " + ", ".join(f"{printable(label)} {p:.4f}" for label, p in r["top"]))


def add_commands(sub) -> None:
    """Register ``export``, ``bench`` and ``predict`` on the CLI's subparsers."""
    p = sub.add_parser("export", help="write ONNX (dynamic batch, deployment metadata), verified against PyTorch")
    p.add_argument("model", metavar="MODEL", help="model file or training checkpoint (runs/x/model.pt)")
    p.add_argument("--out", default=None, help="ONNX file (default: MODEL with the suffix .onnx)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or newer")
    p.add_argument("--tol", type=float, default=1e-3, help="largest allowed |onnxruntime - PyTorch| output difference")
    p.add_argument("--verify-samples", type=int, default=256, help="test images compared")
    _add_data(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("bench", help="params, FLOPs, latency (onnxruntime, PyTorch) and accuracy; original first")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model files / checkpoints or ONNX files; the first "
                   "is the original the ratios refer to")
    p.add_argument("--out", required=True, help="folder for bench.json, bench.md, bench.html and the ONNX files")
    p.add_argument("--names", nargs="+", default=None, help="display names, one per model")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before timing")
    p.add_argument("--repeats", type=int, default=50, help="timed interleaved rounds")
    p.add_argument("--backends", nargs="+", default=None,
                   help="ort-cpu, ort-cuda, torch-cpu, torch-cuda (default: all available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch and onnxruntime")
    p.add_argument("--tol", type=float, default=1e-3, help="export verification tolerance")
    _add_data(p)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("predict", help="classify image files with an exported ONNX model (its metadata only)")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=_cmd_predict)
