"""Bad values through the real command line, one process per case: flags and recipe values of
every command. Each exits with status 2 and one line ``error: ...`` naming the input and what
would be valid, prints no traceback, and leaves every earlier file as it was (see
:mod:`badinput`; hostile files and run folders are in ``test_bad_files.py``)."""

from __future__ import annotations

import pytest

from badinput import RECIPE, T, TINY, Case, check_refused, outcomes_of, recipe



# ----------------------------------------------------------------------------- train flags

def _lr_step_zero(tmp, out, base):
    return Case(["train", *T, "--lr-step", "0", "--out", out], ["--lr-step 0", "at least 1"])


def _nesterov_without_momentum(tmp, out, base):
    return Case(["train", *T, "--momentum", "0", "--out", out], ["--momentum 0.0", "Nesterov", "(0, 1)"])


def _negative_lr(tmp, out, base):
    return Case(["train", *T, "--lr", "-0.1", "--out", out], ["--lr -0.1", "(0, 1000]", "e.g. 0.01"])


def _nan_lr(tmp, out, base):
    return Case(["train", *T, "--lr", "nan", "--out", out], ["--lr nan", "finite number"])


def _infinite_weight_decay(tmp, out, base):
    return Case(["train", *T, "--weight-decay", "inf", "--out", out], ["--weight-decay inf", "finite"])


def _overflowing_lr(tmp, out, base):
    return Case(["train", *T, "--lr", "1e300", "--out", out], ["--lr 1e+300", "(0, 1000]"])


def _zero_image_size(tmp, out, base):
    return Case(["train", *T, "--image-size", "0", "--out", out], ["--image-size 0", "from 1 to 4096"])


def _negative_fc_hidden(tmp, out, base):
    return Case(["train", *T[:4], "--fc-hidden", "-5", *T[6:], "--out", out], ["--fc-hidden '-5'", "positive integer"])


def _nan_width(tmp, out, base):
    return Case(["train", "--model", "vgg6", "--width", "nan", "--out", out], ["--width nan", "finite"])


def _negative_limit(tmp, out, base):
    return Case(["train", *TINY, "--limit-train", "-1", "--out", out], ["--limit-train -1", "at least 1"])


def _empty_subset(tmp, out, base):
    return Case(["train", *TINY, "--limit-train", "0", "--out", out], ["--limit-train 0", "at least 1"])


def _negative_seed(tmp, out, base):
    return Case(["train", *T, "--seed", "-3", "--out", out], ["--seed -3", "from 0 to 4294967295"])


def _val_fraction_one(tmp, out, base):
    return Case(["train", *T, "--val-fraction", "1", "--out", out], ["--val-fraction 1.0", "[0, 1)"])


def _zero_std(tmp, out, base):
    return Case(["train", *T, "--std", "0.5", "0", "0.5", "--out", out], ["--std 0.0", "> 0"])


def _zero_labels(tmp, out, base):
    return Case(["train", *T, "--labels", "0", "--out", out], ["--labels 0", "from 1 to 100000"])


def _not_a_number(tmp, out, base):
    return Case(["train", *T, "--lr", "abc", "--out", out], ["--lr", "invalid float value: 'abc'", "--help"])


def _unknown_flag(tmp, out, base):
    return Case(["train", *T, "--frobnicate", "--out", out], ["unrecognized arguments: --frobnicate"])


def _unknown_schedule(tmp, out, base):
    return Case(["train", *T, "--schedule", "linear", "--out", out], ["'linear'", "choose from", "cosine"])


def _broken_yaml_flag(tmp, out, base):
    return Case(["train", *T, "--lr-factors", "{blocks: [1,", "--out", out], ["--lr-factors", "not valid YAML"])


def _negative_lr_factor(tmp, out, base):
    return Case(["train", *T, "--lr-factors", "{features: -1}", "--out", out],
                ["--lr-factors features -1.0", "[0, 1000]"])


def _unknown_model(tmp, out, base):
    return Case(["train", "--model", "vgg17", "--out", out], ["'vgg17'", "valid: avgg16", "vgg6"])


def _model_of_half_a_terabyte(tmp, out, base):
    argv = ["train", "--model", "vgg16", "--width", "16", "--fc-hidden", "65536", "--image-size", "4096", "--out", out]
    return Case(argv, ["vgg16", "parameters", "more than the 1,073,741,824"], max_seconds=20)


def _unwritable_out(tmp, out, base):
    # A folder below a regular file cannot be created, even by root (chmod does not stop root).
    blocker = tmp / "out" / "file.txt"
    blocker.write_bytes(b"an earlier artifact\n")
    target = blocker / "sub"
    return Case(["train", *TINY, "--out", str(target)], [str(target), "is not writable", "writable --out"])


# ----------------------------------------------------------------------------- analyze, cifar-k, taps flags

def _threshold(tmp, out, base):
    return Case(["analyze", "--checkpoint", str(base.ckpt), "--threshold", "1.5", "--out", out],
                ["threshold 1.5", "outside (0, 1)", "0.3"])


def _nan_tolerance(tmp, out, base):
    return Case(["analyze", "--checkpoint", str(base.ckpt), "--tolerance", "nan", "--out", out],
                ["--tolerance nan", "finite"])


def _zero_probe_epochs(tmp, out, base):
    return Case(["analyze", "--checkpoint", str(base.ckpt), "--probe-epochs", "0", "--out", out],
                ["--probe-epochs 0", "at least 1"])


QUICK = ["--probe-epochs", "1", "--limit-train", "200", "--limit-test", "100", "--taps", "features.pool4"]


def _negative_tap_pool(tmp, out, base):
    return Case(["analyze", "--checkpoint", str(base.ckpt), *QUICK, "--tap-pool", "-2", "--out", out],
                ["--tap-pool -2"])


def _negative_memory(tmp, out, base):
    return Case(["analyze", "--checkpoint", str(base.ckpt), *QUICK, "--max-memory-gb", "-1", "--out", out],
                ["--max-memory-gb -1"])


def _bad_decision(tmp, out, base):
    return Case(["analyze", "--checkpoint", str(base.ckpt), "--decision", "sample:0", "--out", out],
                ["decision", "sample:N with N >= 1"])


def _unknown_dataset(tmp, out, base):
    return Case(["analyze", "--checkpoint", str(base.ckpt), "--data", "cifar11", "--out", out],
                ["'cifar11'", "valid:", "digits"])


def _unknown_tap(tmp, out, base):
    return Case(["analyze", "--checkpoint", str(base.ckpt), "--taps", "features.pool9", "--out", out],
                ["'features.pool9'", "valid:", "features.pool5"])


def _too_many_labels(tmp, out, base):
    return Case(["analyze", "--checkpoint", str(base.ckpt), "--labels", "11", "--out", out], ["K=11", "outside 1..10"])


def _cifar_k_zero(tmp, out, base):
    return Case(["cifar-k", *T, "--ks", "0", "3", "--out", out], ["--ks 0", "positive number of labels"])


def _cifar_k_nan_lr(tmp, out, base):
    return Case(["cifar-k", *T, "--ks", "2", "3", "--lr", "nan", "--out", out], ["--lr nan", "finite"])


def _taps_huge_input(tmp, out, base):
    return Case(["taps", "vgg6", "--img-size", "100000"], ["--img-size 100000", "from 1 to 4096"], max_seconds=10)


def _taps_negative_hidden(tmp, out, base):
    return Case(["taps", "vgg6", "--fc-hidden", "-5"], ["--fc-hidden '-5'", "positive integer"])


# ----------------------------------------------------------------------------- deploy flags

def _bench_negative_threads(tmp, out, base):
    return Case(["bench", str(base.model), "--threads", "-2", "--out", out], ["--threads -2", "from 1 to 1024"])


def _bench_zero_repeats(tmp, out, base):
    return Case(["bench", str(base.model), "--repeats", "0", "--out", out], ["--repeats 0", "at least 1"])


def _bench_zero_burst(tmp, out, base):
    return Case(["bench", str(base.model), "--burst", "0", "--out", out], ["--burst 0", "at least 1"])


def _bench_zero_batch(tmp, out, base):
    return Case(["bench", str(base.model), "--batch-sizes", "1", "0", "--out", out], ["--batch-sizes 0"])


def _export_no_verification(tmp, out, base):
    target = tmp / "out" / "model.onnx"
    return Case(["export", str(base.model), "--verify-samples", "0", "--out", str(target)],
                ["--verify-samples 0", "at least 1"])


def _export_nan_tolerance(tmp, out, base):
    return Case(["export", str(base.model), "--tol", "nan", "--out", str(tmp / "out" / "m.onnx")],
                ["--tol nan", "positive finite"])


def _export_old_opset(tmp, out, base):
    return Case(["export", str(base.model), "--opset", "5", "--out", str(tmp / "out" / "m.onnx")],
                ["opset 5", "use 17 to"])


def _export_onto_itself(tmp, out, base):
    return Case(["export", str(base.model), "--out", str(base.model)], ["is the model file itself"])


def _predict_top_zero(tmp, out, base):
    return Case(["predict", str(base.onnx), str(tmp / "x.png"), "--top-k", "0"], ["--top-k 0", "at least 1"])


# ----------------------------------------------------------------------------- recipes (run, demo)

def _set_broken_yaml(tmp, out, base):
    return Case(["run", recipe(tmp), "--set", "analysis.probe_epochs=[1,", "--out", out],
                ["--set analysis.probe_epochs", "'[1,'", "not valid YAML", "line 1"])


def _set_without_value(tmp, out, base):
    return Case(["run", recipe(tmp), "--set", "model.train.epochs", "--out", out], ["expected key.path=value"])


def _recipe_nan(tmp, out, base):
    model = {**RECIPE["model"], "train": {"epochs": 1, "lr": float("nan")}}  # written as .nan
    return Case(["run", recipe(tmp, {"model": model}), "--out", out], ["recipe.model.train.lr nan", "finite"])


def _recipe_huge_image(tmp, out, base):
    return Case(["run", recipe(tmp, {"data": {**RECIPE["data"], "image_size": 100000}}), "--out", out],
                ["recipe.data.image_size", "100000", "from 1 to 4096"])


def _recipe_negative_width(tmp, out, base):
    model = {**RECIPE["model"], "options": {"width": -1}}
    return Case(["run", recipe(tmp, {"model": model}), "--out", out], ["recipe.model.options.width", "-1", "(0, 16]"])


def _recipe_name_escapes(tmp, out, base):
    return Case(["run", recipe(tmp, {"name": "../../etc"}), "--dry-run"], ["recipe.name '../../etc'", "runs/<name>"])


def _recipe_name_empty(tmp, out, base):
    return Case(["run", recipe(tmp, {"name": ""}), "--dry-run"], ["recipe.name ''", "is empty"])


def _recipe_name_control(tmp, out, base):
    return Case(["run", recipe(tmp, {"name": "a\x1b[31mb"}), "--dry-run"], ["recipe.name", "control characters"])


def _recipe_is_a_list(tmp, out, base):
    return Case(["run", recipe(tmp, text="- trim\n- export\n"), "--out", out], ["a recipe is a YAML mapping"])


def _recipe_unknown_key(tmp, out, base):
    return Case(["run", recipe(tmp, {"modle": {}}), "--out", out], ["'modle'", "did you mean 'model'", "valid:"])


def _recipe_wrong_type(tmp, out, base):
    model = {**RECIPE["model"], "train": {"epochs": "ten"}}
    return Case(["run", recipe(tmp, {"model": model}), "--out", out], ["recipe.model.train.epochs", "expected int",
                                                                      "'ten'"])


def _recipe_finetune_momentum(tmp, out, base):
    steps = [{"trim": {"tap": "plateau"}}, {"finetune": {"momentum": 0}}]
    return Case(["run", recipe(tmp, {"steps": steps}), "--out", out],
                ["recipe.steps[1].finetune.momentum", "Nesterov"])


def _recipe_bench_threads(tmp, out, base):
    return Case(["run", recipe(tmp, {"steps": [{"bench": {"threads": -2}}]}), "--out", out],
                ["recipe.steps[0].bench.threads", "-2"])


def _recipe_step_after_export(tmp, out, base):
    return Case(["run", recipe(tmp, {"steps": [{"export": {}}, {"trim": {"tap": "plateau"}}]}), "--out", out],
                ["recipe.steps[1].trim changes the model after export"])


def _unknown_step(tmp, out, base):
    return Case(["run", recipe(tmp, {"steps": [{"prnue": {}}]}), "--out", out],
                ["'prnue'", "recipe.steps[0]", "valid:", "dilute", "trim"])


def _recipe_missing(tmp, out, base):
    return Case(["run", str(tmp / "nope.yaml"), "--out", out], ["nope.yaml", "does not exist"])


def _demo_zero_epochs(tmp, out, base):
    return Case(["demo", "--set", "model.train.epochs=0", "--out", out], ["recipe.model.train.epochs: 0", "from 1 to"])


def _dilution_target(tmp, out, base):
    steps = [{"dilute": {"layer": "features.conv5", "target": 600}}]
    return Case(["run", recipe(tmp, {"steps": steps}), "--out", out],
                ["target 600", "features.conv5 with 64 filters", "choose 1..64", "'auto'"])


CASES = [_lr_step_zero, _nesterov_without_momentum, _negative_lr, _nan_lr, _infinite_weight_decay, _overflowing_lr,
         _zero_image_size, _negative_fc_hidden, _nan_width, _negative_limit, _empty_subset, _negative_seed,
         _val_fraction_one, _zero_std, _zero_labels, _not_a_number, _unknown_flag, _unknown_schedule,
         _broken_yaml_flag, _negative_lr_factor, _unknown_model, _model_of_half_a_terabyte, _unwritable_out,
         _threshold, _nan_tolerance, _zero_probe_epochs, _negative_tap_pool, _negative_memory, _bad_decision,
         _unknown_dataset, _unknown_tap, _too_many_labels, _cifar_k_zero, _cifar_k_nan_lr, _taps_huge_input,
         _taps_negative_hidden, _bench_negative_threads, _bench_zero_repeats, _bench_zero_burst, _bench_zero_batch,
         _export_no_verification, _export_nan_tolerance, _export_old_opset, _export_onto_itself, _predict_top_zero,
         _set_broken_yaml, _set_without_value, _recipe_nan, _recipe_huge_image, _recipe_negative_width,
         _recipe_name_escapes, _recipe_name_empty, _recipe_name_control, _recipe_is_a_list, _recipe_unknown_key,
         _recipe_wrong_type, _recipe_finetune_momentum, _recipe_bench_threads, _recipe_step_after_export,
         _unknown_step, _recipe_missing, _demo_zero_epochs, _dilution_target]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    yield from outcomes_of(CASES, tmp_path_factory)


@pytest.mark.parametrize("name", [pytest.param(c.__name__, id=c.__name__.lstrip("_")) for c in CASES])
def test_bad_value_is_refused_in_one_line_and_loses_nothing(name, outcomes):
    check_refused(outcomes[name])
