"""Faults injected into training and malformed input fed to the CLI: a clean error, never a traceback."""

import random
import types

import pytest
import torch

import dmlkit
from dmlkit.plugins import get_host


def add_loss(name, forward):
    plugin = types.ModuleType(f"plugin_{name}")

    class Loss(torch.nn.Module):
        def forward(self, emb, labels, indices=None):
            return forward(emb, labels)

    @dmlkit.hookimpl
    def register_losses(register):
        register(dmlkit.ComponentSpec(name, Loss))

    plugin.register_losses = register_losses
    get_host().add_plugin(plugin, f"plugin_{name}")


def test_out_of_memory_suggests_a_smaller_batch(cli, tmp_path):
    def oom(emb, labels):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    add_loss("oom_loss", oom)
    code, _, err = cli("train", "--loss", "oom_loss", "--epochs", "1", "--run-dir", str(tmp_path / "r"))
    assert code == 1 and "out of GPU memory at epoch 1, step 1 with batch_size 64" in err
    assert "--batch-size 32" in err and len(err.strip().splitlines()) == 1


def test_a_loss_that_raises_is_named_with_its_plugin(cli, tmp_path):
    def broken(emb, labels):
        raise IndexError("list index out of range")

    add_loss("broken_loss", broken)
    code, _, err = cli("train", "--loss", "broken_loss", "--epochs", "1", "--run-dir", str(tmp_path / "r"))
    assert code == 1
    assert "loss 'broken_loss' (plugin 'plugin_broken_loss') failed at epoch 1, step 1: IndexError" in err


def test_a_loss_that_returns_garbage_is_refused(cli, tmp_path):
    add_loss("vector_loss", lambda emb, labels: emb.sum(1))
    code, _, err = cli("train", "--loss", "vector_loss", "--epochs", "1", "--run-dir", str(tmp_path / "r"))
    assert code == 1 and "must return a scalar tensor" in err


KEYS = [
    "epochs",
    "lr",
    "batch_size",
    "optimizer",
    "scheduler",
    "embedding_size",
    "pooling",
    "grad_clip",
    "seed",
    "warmup_epochs",
    "device",
    "best_metric",
    "val_fraction",
    "eval_every",
    "head_norm",
    "nonfinite",
    "epocs",
]
VALUES = [
    "-1",
    "0",
    "1",
    "0.5",
    "1e308",
    "nan",
    "inf",
    "true",
    "abc",
    '"x"',
    "[1, 2]",
    "{a = 1}",
    "",
    "=",
    "[",
    "64",
    "cuda",
    "cpu",
    "adamw",
    "'unterminated",
]
COMPONENT_OPTS = {
    "--loss-opt": ["margin", "scale", "alpha", "proxies_per_class", "num_classes", "exclude_positive", "nope"],
    "--miner-opt": ["epsilon", "margin", "squared"],
    "--sampler-opt": ["m", "batches_per_epoch", "seed"],
    "--dataset-opt": ["train_classes", "root"],
    "--backbone-opt": ["channels", "blocks", "in_channels"],
    "--evaluator-opt": ["ks", "backend", "memory_mb"],
}
NAMES = {
    "--loss": ["triplet", "proxynca", "ms", "nope", ""],
    "--miner": ["semihard", "none", "batch_all", "x"],
    "--sampler": ["random", "one_per_class", "pk", "?"],
    "--dataset": ["digits", "cub200", "omniglot", "zzz"],
    "--backbone": ["smallcnn", "resnet", ""],
}


def random_argv(rng):
    argv = ["train"]
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.35:
            argv += ["--set", f"{rng.choice(KEYS)}={rng.choice(VALUES)}"]
        elif choice < 0.7:
            flag = rng.choice(list(COMPONENT_OPTS))
            argv += [flag, f"{rng.choice(COMPONENT_OPTS[flag])}={rng.choice(VALUES)}"]
        elif choice < 0.9:
            flag = rng.choice(list(NAMES))
            argv += [flag, rng.choice(NAMES[flag])]
        else:
            argv += [rng.choice(["--epochs", "--lr", "--batch-size", "--bogus", "--seed"]), rng.choice(VALUES)]
    return argv


def random_toml(rng):
    lines = []
    for _ in range(rng.randint(1, 5)):
        lines.append(
            rng.choice(
                [
                    "[train]",
                    "[loss]",
                    "[dataset]",
                    "[sampler]",
                    "[[callbacks]]",
                    "[trian]",
                    "[loss",
                    "name = 'triplet'",
                    "name = 42",
                ]
            )
        )
        lines.append(f"{rng.choice(KEYS + ['name', 'margin', 'm'])} = {rng.choice(VALUES)}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("case", range(60))
def test_fuzzed_command_lines_end_cleanly(cli, tmp_path, case):
    rng = random.Random(case)
    if case % 3 == 2:
        cfg = tmp_path / "c.toml"
        cfg.write_text(random_toml(rng))
        argv = ["train", "--config", str(cfg)]
    else:
        argv = random_argv(rng)
    # keep any run that is valid short, and in tmp_path
    argv += ["--epochs", "1", "--set", "eval_every=1", "--run-dir", str(tmp_path / "run")]
    code, out, err = cli(*argv)
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err and "Traceback" not in out, (argv, err)
    if code:
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, (argv, err)


def test_non_finite_gradient_stops_the_run(cli, tmp_path):
    # a finite loss (0) whose gradient is infinite: d sqrt(x)/dx at x = 0
    add_loss("inf_grad_loss", lambda emb, labels: torch.sqrt((emb * 0).sum()))
    code, _, err = cli("train", "--loss", "inf_grad_loss", "--epochs", "1", "--run-dir", str(tmp_path / "r"))
    assert code == 1 and "non-finite gradient" in err and "at epoch 1, step 1" in err
