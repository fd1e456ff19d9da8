"""The deployment commands ``export``, ``quantize``, ``bench`` and ``predict``: thin wrappers around
:mod:`compress.deploy.export`, :mod:`compress.deploy.quantize`, :mod:`compress.deploy.bench` and
:mod:`compress.deploy.predict`."""

from __future__ import annotations

import argparse
from pathlib import Path

from compress.errors import UserError, printable, shorten

__all__ = ["add_commands"]

# flag -> (smallest, largest) of the integer flags of these commands
_INT_RANGES = {"labels": (1, 100_000), "image_size": (1, 4096), "limit_test": (1, None), "verify_samples": (1, None),
               "threads": (1, 1024), "warmup": (0, None), "repeats": (1, None), "burst": (1, None), "top_k": (1, None),
               "limit_train": (1, None), "split_seed": (0, 2**32 - 1)}


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
    meta = read_model_file_meta(args.models[0])
    if args.int8:  # the training images calibrate (the validation split held out, as in training)
        from compress.deploy.quantize import load_quantize_data

        bundle = load_quantize_data(meta, args.data, root=args.data_root, download=args.download,
                                    num_labels=args.labels, image_size=args.image_size, limit_test=args.limit_test)
    else:
        bundle = _test_data(args, meta)
    with run_folder_lock(args.out):
        result = run_bench(args.models, bundle, args.out, names=args.names, batch_sizes=args.batch_sizes,
                           warmup=args.warmup, repeats=args.repeats, backends=args.backends, threads=args.threads,
                           tol=args.tol, int8=args.int8, burst=args.burst)
        write_bench_report(result, args.out)
    header, rows, ratio_header, ratios = summary_rows(result)
    how = "interleaved repeats" if args.burst == 1 else f"repeats, interleaved in bursts of {args.burst} calls"
    print(f"latency: {primary_backend(result)}, median of {args.repeats} {how}")
    for table in ((header, rows), (["ratio to original", *ratio_header[1:]], ratios)):
        widths = [max(len(str(r[i])) for r in [table[0], *table[1]]) + 2 for i in range(len(table[0]))]
        for r in [table[0], *table[1]]:
            print("".join(f"{str(v):<{w}}" for v, w in zip(r, widths)).rstrip())
        print()
    from compress.reports.bench import int8_note

    note = int8_note(result)
    if note:
        print(note)
    print(f"report: {Path(args.out) / 'bench.html'}")


def _cmd_quantize(args: argparse.Namespace) -> None:
    import json
    import math

    from compress.deploy.quantize import QuantizeSettings, load_quantize_data, quantize_onnx
    from compress.errors import OptionError
    from compress.io import atomic_write_text

    _check_flags(args)
    if not (math.isfinite(args.val_fraction) and 0 < args.val_fraction < 1):
        raise UserError(f"--val-fraction {args.val_fraction}: must be in (0, 1); the gate runs on the validation "
                        f"images held out of the training split (default 0.1, as in training)")
    try:
        settings = QuantizeSettings(mode="dynamic" if args.dynamic else "static", method=args.method,
                                    calibration_images=args.calibration_images, per_channel=args.per_channel,
                                    max_drop=args.max_drop, on_fail=args.on_fail, retries=args.retries,
                                    exclude_per_round=args.exclude_per_round)
    except OptionError as e:
        raise UserError(f"--{e.key.replace('_', '-')} {e.message}") from None
    model = Path(args.model)
    if model.suffix.lower() != ".onnx":
        raise UserError(f"quantize takes an ONNX file (MODEL.onnx), not {shorten(args.model)}; export a model file "
                        f"first with `compress export`")
    out = Path(args.out) if args.out else model.with_name(model.stem + ".int8.onnx")
    if out.is_dir():
        raise UserError(f"--out {shorten(str(out))} is a folder; give the ONNX file to write, e.g. model.int8.onnx")
    if out.exists() and model.exists() and out.resolve() == model.resolve():
        raise UserError(f"--out {shorten(str(out))} is the model file itself; give another file, e.g. model.int8.onnx")
    from compress.deploy.bench import read_model_file_meta

    meta = read_model_file_meta(model)  # refuses a missing, corrupt or metadata-less file before any data is read
    bundle = load_quantize_data(meta, args.data, root=args.data_root, download=args.download, num_labels=args.labels,
                                image_size=args.image_size, limit_train=args.limit_train,
                                val_fraction=args.val_fraction, split_seed=args.split_seed)
    info = quantize_onnx(model, out, bundle, bundle.val, settings)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"source": str(model), **info}, indent=2, default=str))
    ops = ", ".join(f"{n} {k}" for k, n in sorted(info["quantized_ops"].items()))
    kind = f"static QDQ, {info['method']} on {info['calibration_images']} training images" \
        if info["mode"] == "static" else "dynamic"
    print(f"wrote {info['path']} ({info['int8_size'] / 1024:.1f} KiB, FP32 {info['fp32_size'] / 1024:.1f} KiB; {kind}; "
          f"INT8 operators: {ops or 'none'})")
    excluded = f"; left in FP32: {', '.join(info['excluded'])}" if info["excluded"] else ""
    print(f"validation accuracy ({len(bundle.val)} images): FP32 {info['fp32_accuracy']:.4f}, INT8 "
          f"{info['int8_accuracy']:.4f} ({0.0 - info['drop_points'] + 0.0:+.2f} points, max drop {args.max_drop:g})"
          f"{excluded}")
    print(f"details: {out.with_suffix('.json')}")


def _cmd_predict(args: argparse.Namespace) -> None:
    from compress.deploy.predict import predict_images

    _check_flags(args)
    if Path(args.model).suffix.lower() in (".pt", ".pth", ".safetensors", ".ckpt"):
        raise UserError(f"predict runs an ONNX file; export {shorten(args.model)} first with `compress export`")
    for r in predict_images(args.model, args.images, top_k=args.top_k, device=args.device):
        # names come from the file: control characters are escaped, never sent to the terminal
        print(f"{printable(r['file'])}: " + ", ".join(f"{printable(label)} {p:.4f}" for label, p in r["top"]))


def add_commands(sub) -> None:
    """Register ``export``, ``quantize``, ``bench`` and ``predict`` on the CLI's subparsers."""
    p = sub.add_parser("export", help="write ONNX (dynamic batch, deployment metadata), verified against PyTorch")
    p.add_argument("model", metavar="MODEL", help="model file or training checkpoint (runs/x/model.pt)")
    p.add_argument("--out", default=None, help="ONNX file (default: MODEL with the suffix .onnx)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or newer")
    p.add_argument("--tol", type=float, default=1e-3, help="largest allowed |onnxruntime - PyTorch| output difference")
    p.add_argument("--verify-samples", type=int, default=256, help="test images compared")
    _add_data(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("quantize", help="INT8 ONNX with onnxruntime (static QDQ or dynamic), behind an accuracy "
                       "gate on the validation split")
    p.add_argument("model", metavar="MODEL.onnx", help="an ONNX file from `compress export` (it carries its metadata)")
    p.add_argument("--out", default=None, help="INT8 ONNX file (default: MODEL.int8.onnx); details in the same name "
                   "with the suffix .json")
    p.add_argument("--calibration-images", type=int, default=300, metavar="N", help="training images the static "
                   "calibration runs on (default: 300)")
    p.add_argument("--method", default="minmax", choices=["minmax", "percentile", "entropy"],
                   help="static calibration method (default: minmax)")
    p.add_argument("--dynamic", action="store_true", help="dynamic quantization (weights only; no calibration)")
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True,
                   help="one scale per output channel of every weight (default: on)")
    p.add_argument("--max-drop", type=float, default=1.0, metavar="POINTS", help="largest accepted validation accuracy "
                   "drop, INT8 against FP32, in points (default: 1)")
    p.add_argument("--on-fail", default="exclude", choices=["exclude", "stop"], help="past --max-drop: exclude (leave "
                   "the layers with the largest quantization error in FP32 and retry) or stop (default: exclude)")
    p.add_argument("--retries", type=int, default=3, help="exclusion rounds before giving up (default: 3)")
    p.add_argument("--exclude-per-round", type=int, default=2, help="layers left in FP32 per round (default: 2)")
    _add_data(p)
    g = p.add_argument_group("validation split (as in training: the same fraction and seed hold out the same images)")
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of the training images held out (default 0.1)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the validation split (default 0)")
    g.add_argument("--limit-train", type=int, default=None, help="the training run's --limit-train, if it had one")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("bench", help="params, FLOPs, latency (onnxruntime, PyTorch) and accuracy; original first")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model files / checkpoints or ONNX files; the first "
                   "is the original the ratios refer to")
    p.add_argument("--out", required=True, help="folder for bench.json, bench.md, bench.html and the ONNX files")
    p.add_argument("--names", nargs="+", default=None, help="display names, one per model")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before timing")
    p.add_argument("--repeats", type=int, default=50, help="timed calls of each model")
    p.add_argument("--burst", type=int, default=1, help="calls per model and turn of a round, the first half untimed: "
                   "1 times each call right after another model's (cold caches, as a server switching models), "
                   "e.g. 20 the steady state of a model served alone")
    p.add_argument("--backends", nargs="+", default=None,
                   help="ort-cpu, ort-cuda, ort-trt (TensorRT), torch-cpu, torch-cuda (default: all available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch and onnxruntime")
    p.add_argument("--tol", type=float, default=1e-3, help="export verification tolerance")
    p.add_argument("--int8", action="store_true", help="also bench an INT8 variant of every model (onnxruntime static "
                   "QDQ, calibrated on training images); without VNNI the report says INT8 has no fast path here")
    _add_data(p)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("predict", help="classify image files with an exported ONNX model (its metadata only)")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=_cmd_predict)
