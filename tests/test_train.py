import json
import os
import pickle
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import dmlkit
from dmlkit.checkpoint import load as load_checkpoint
from dmlkit.errors import DmlkitError
from dmlkit.plugins import get_host


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def read_results(run):
    """Test metrics at the chosen epoch (``test``) and at the last (``test_last``), read once at the end."""
    return json.loads((run / "results.json").read_text())


def test_digits_default_run_learns_and_fills_the_run_directory(cli, tmp_path):
    run = tmp_path / "run"
    code, out, err = cli("train", "--epochs", "3", "--run-dir", str(run))
    assert code == 0, err
    for name in ("config.toml", "metrics.jsonl", "last.pt", "best.pt", "loss.png", "metrics.png", "results.json"):
        assert (run / name).is_file(), name
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # validation (held-out images of the training digits) every epoch; the test set is not read per epoch
    assert all("val_map_at_r" in r and "map_at_r" not in r for r in rows)
    results = read_results(run)
    best = max(rows, key=lambda r: r["val_map_at_r"])
    assert results["best_epoch"] == best["epoch"] and results["selection_split"] == "val"
    assert results["test_last"]["precision_at_1"] > 0.85 and rows[-1]["loss"] < rows[0]["loss"]
    assert "epoch" in out and "chosen (best by validation map_at_r" in out and "higher is better" in out
    ckpt = load_checkpoint(run)
    assert ckpt["epoch"] == 3 and ckpt["config"]["dataset"]["name"] == "digits"
    # the proxies were trained: they are in the optimizer with their multiplier
    groups = ckpt["optimizer"]["param_groups"]
    assert any(g["name"] == "loss.bank.vectors" and g["lr_multiplier"] == 100.0 for g in groups)
    # the saved config reproduces the run
    run2 = tmp_path / "run2"
    code, _, err = cli("train", "--config", str(run / "config.toml"), "--run-dir", str(run2))
    assert code == 0, err
    assert read_results(run2)["test"]["map_at_r"] == pytest.approx(results["test"]["map_at_r"], abs=1e-6)
    # a run directory is never overwritten
    code, _, err = cli("train", "--run-dir", str(run))
    assert code == 1 and "already holds a run" in err


def test_killed_run_resumes_to_the_same_metrics(cli, tmp_path):
    args = ["--epochs", "4", "--loss", "triplet", "--miner", "semihard", "--set", "eval_every=1"]
    full = tmp_path / "full"
    assert cli("train", *args, "--run-dir", str(full))[0] == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmlkit", "train", *args, "--run-dir", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "last.pt").exists():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = load_checkpoint(killed)["epoch"]
    assert 1 <= done <= 4
    code, _, err = cli("train", "--resume", str(killed))
    assert code == 0, err
    a, b = read_metrics(full), read_metrics(killed)
    assert [r["epoch"] for r in b] == [1, 2, 3, 4]
    for key in ("loss", "val_precision_at_1", "val_map_at_r"):
        assert b[-1][key] == pytest.approx(a[-1][key], abs=1e-6), key
    for key in ("precision_at_1", "map_at_r"):
        assert read_results(killed)["test"][key] == pytest.approx(read_results(full)["test"][key], abs=1e-6), key


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--set", "batch_size=400", "--sampler-opt", "m=200"), "larger than the samples of every class"),
        (("--set", "embedding_size=-1"), "'embedding_size' must be >= 0; got -1"),
        (("--set", "optimizer=adamx"), "'optimizer' must be one of adam, adamw, sgd"),
        (("--set", "lr=fast"), "train setting 'lr' must be float"),
        (("--loss-opt", "num_classes=3"), "'num_classes' is set by the trainer"),
        (("--dataset", "cub200"), "needs its folder: pass --data-root"),
        (("--dataset", "cub200", "--data-root", "/nonexistent"), "root folder /nonexistent does not exist"),
    ],
)
def test_bad_configuration_is_refused_before_work(cli, tmp_path, argv, message):
    run = tmp_path / "run"
    code, _, err = cli("train", *argv, "--run-dir", str(run))
    assert code == 1 and message in err
    assert not (run / "last.pt").exists()


def test_bad_config_file(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochs = 'x'\n")
    code, _, err = cli("train", "--config", str(bad))
    assert code == 1 and "train setting 'epochs' must be int" in err
    bad.write_text("[trian]\nepochs = 2\n")
    code, _, err = cli("train", "--config", str(bad))
    assert code == 1 and "unknown config section 'trian'; did you mean 'train'" in err
    bad.write_text("[miner]\nepsilon = 0.1\n")  # brackets in a message survive the console's markup
    code, _, err = cli("train", "--config", str(bad))
    assert code == 1 and "[miner] has options but no component name" in err
    bad.write_text("[train\n")
    code, _, err = cli("train", "--config", str(bad))
    assert code == 1 and "is not valid TOML" in err


def test_non_finite_loss_stops_with_a_clear_message(cli, tmp_path):
    plugin = types.ModuleType("nanplugin")

    class NanLoss(torch.nn.Module):
        def forward(self, emb, labels, indices=None):
            return emb.sum() * float("nan")

    @dmlkit.hookimpl
    def register_losses(register):
        register(dmlkit.ComponentSpec("nan_loss", NanLoss))

    plugin.register_losses = register_losses
    get_host().add_plugin(plugin, "nanplugin")
    code, _, err = cli("train", "--loss", "nan_loss", "--epochs", "1", "--run-dir", str(tmp_path / "r"))
    assert code == 1 and "non-finite loss (nan) at epoch 1, step 1" in err and "lower the lr" in err
    code, out, err = cli(
        "train", "--loss", "nan_loss", "--epochs", "1", "--set", "nonfinite=skip", "--run-dir", str(tmp_path / "r2")
    )
    assert code == 0 and "step skipped" in out


def test_deferred_finiteness_check_names_the_first_bad_step(cli, tmp_path, monkeypatch):
    """On a GPU the checks run on the device and are read every sync_every steps (forced here on the CPU)."""

    plugin = types.ModuleType("latenan")

    class LateNan(torch.nn.Module):
        """Finite for 3 steps, then NaN."""

        calls = 0

        def forward(self, emb, labels, indices=None):
            LateNan.calls += 1
            return emb.square().mean() * (float("nan") if LateNan.calls > 3 else 1.0)

    @dmlkit.hookimpl
    def register_losses(register):
        register(dmlkit.ComponentSpec("late_nan", LateNan))

    plugin.register_losses = register_losses
    get_host().add_plugin(plugin, "latenan")
    from dmlkit.finite import FiniteGuard

    init = FiniteGuard.__init__

    def on_the_device(self, *args):  # as on a GPU: checked on the device, read every sync_every steps
        init(self, *args)
        self.each_step = False

    monkeypatch.setattr(FiniteGuard, "__init__", on_the_device)
    code, _, err = cli(
        "train", "--loss", "late_nan", "--epochs", "1", "--set", "sync_every=5", "--run-dir", str(tmp_path / "r")
    )
    assert code == 1 and "non-finite loss or gradient at epoch 1, step 4" in err


def test_failing_callback_names_its_plugin(cli, tmp_path):
    plugin = types.ModuleType("cbplugin")

    class Boom:
        def on_epoch_end(self, trainer, record):
            raise RuntimeError("kaput")

    @dmlkit.hookimpl
    def register_callbacks(register):
        register(dmlkit.ComponentSpec("boom", Boom))

    plugin.register_callbacks = register_callbacks
    get_host().add_plugin(plugin, "cbplugin")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[train]\nepochs = 1\n[[callbacks]]\nname = "boom"\n')
    code, _, err = cli("train", "--config", str(cfg), "--run-dir", str(tmp_path / "r"))
    assert code == 1 and "callback 'boom' (plugin 'cbplugin') failed in on_epoch_end: RuntimeError: kaput" in err


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_does_not_run_code(tmp_path):
    marker = tmp_path / "pwned"
    Exploit.marker = marker
    bad = tmp_path / "last.pt"
    with open(bad, "wb") as f:
        pickle.dump({"format": "dmlkit", "config": Exploit()}, f)
    with pytest.raises(DmlkitError, match="cannot load checkpoint"):
        load_checkpoint(bad)
    assert not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DmlkitError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_embed_and_evaluate_a_run(cli, tmp_path):
    run = tmp_path / "run"
    assert cli("train", "--epochs", "1", "--run-dir", str(run))[0] == 0
    code, out, err = cli("embed", str(run), "--out", str(tmp_path / "emb"))
    assert code == 0, err
    code, out, err = cli(
        "evaluate",
        "--embeddings",
        str(tmp_path / "emb" / "embeddings.npy"),
        "--labels",
        str(tmp_path / "emb" / "labels.npy"),
        "--json",
        "--no-clustering",
    )
    from_files = json.loads(out)
    code, out, err = cli("evaluate", str(run), "--json", "--no-clustering")
    assert json.loads(out)["map_at_r"] == pytest.approx(from_files["map_at_r"], abs=1e-6)
    assert from_files["map_at_r"] == pytest.approx(read_results(run)["test"]["map_at_r"], abs=1e-6)
    code, out, err = cli("evaluate", str(run))
    assert code == 0 and "best.pt: epoch 1 (best by validation map_at_r)" in out


def test_ddp_two_cpu_processes_with_gloo(tmp_path):
    """torchrun with 2 processes: each rank trains on its share, rank 0 writes the run directory."""
    run = tmp_path / "ddp"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29517",
            "-m",
            "dmlkit",
            "train",
            "--epochs",
            "2",
            "--run-dir",
            str(run),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    # each rank took half of the epoch's batches
    from dmlkit.config import resolve
    from dmlkit.train import Trainer

    cfg, _ = resolve({}, get_host().registry)
    single_steps = len(Trainer(cfg, get_host().registry, tmp_path / "unused").sampler)
    assert rows[0]["step"] == single_steps // 2
    assert read_results(run)["test_last"]["precision_at_1"] > 0.8
    assert out.stdout.count("run directory:") == 1  # only rank 0 speaks
    assert "Warning" not in out.stderr, out.stderr[-2000:]  # torch deprecated the gather dmlkit used


def _gather_worker(rank, init, results):
    import torch.distributed as dist

    from dmlkit.distributed import gather_batch

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.manual_seed(0)
    full = torch.randn(6, 3, dtype=torch.float64)  # both ranks' batches; rank r holds rows 3r..3r+2
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    mine = full[3 * rank : 3 * rank + 3].clone().requires_grad_(True)
    emb, lab = gather_batch(mine, labels[3 * rank : 3 * rank + 3])
    ((emb @ emb.T) * (lab[:, None] == lab[None, :])).sum().mul(rank + 1).backward()  # a different loss per rank
    results[rank] = (emb.detach().clone(), lab.clone(), mine.grad.clone())
    dist.destroy_process_group()


def test_gathered_batches_carry_every_ranks_gradient(tmp_path):
    """gather_batch under 2 gloo processes: every rank sees both batches, and a rank's embeddings get
    the gradient of the sum of both ranks' losses (as torch.distributed.nn's all_gather gave)."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(f"file://{tmp_path / 'init'}", results), nprocs=2, join=True)
    torch.manual_seed(0)
    full = torch.randn(6, 3, dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    same = (labels[:, None] == labels[None, :]).double()
    ((full @ full.T) * same).sum().mul(1 + 2).backward()  # rank 0's loss plus rank 1's (weights 1 and 2)
    for rank in range(2):
        emb, lab, grad = results[rank]
        torch.testing.assert_close(emb, full.detach())
        assert lab.tolist() == labels.tolist()
        torch.testing.assert_close(grad, full.grad[3 * rank : 3 * rank + 3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_run_with_bf16_and_channels_last(cli, tmp_path):
    code, _, err = cli(
        "train",
        "--epochs",
        "2",
        "--device",
        "cuda",
        "--loss",
        "triplet",
        "--miner",
        "semihard",
        "--run-dir",
        str(tmp_path / "gpu"),
    )
    assert code == 0, err
    assert read_metrics(tmp_path / "gpu")[-1]["precision_at_1"] > 0.85


def test_resume_refuses_options_that_would_change_the_run(cli, tmp_path):
    run = tmp_path / "r"
    assert cli("train", "--epochs", "1", "--run-dir", str(run))[0] == 0
    code, _, err = cli("train", "--resume", str(run), "--loss", "triplet")
    assert code == 1 and "--loss cannot change it" in err


def test_epoch_record_says_where_time_went(cli, tmp_path):
    assert cli("train", "--epochs", "1", "--run-dir", str(tmp_path / "r"))[0] == 0
    row = read_metrics(tmp_path / "r")[0]
    assert 0.0 <= row["data_wait_fraction"] < 1.0 and row["images_per_s"] > 0


def test_components_recommend_settings_and_the_user_wins(cli, tmp_path):
    from dmlkit.config import resolve

    reg = get_host().registry
    cfg, applied = resolve({}, reg)  # digits has 5 training classes: 4 classes x 16, validation on held-out images
    assert cfg["sampler"]["m"] == 16 and applied == {"sampler": {"m": 16}, "train": {"val_split": "samples"}}
    cfg, applied = resolve({"sampler": {"m": 8}}, reg)
    assert cfg["sampler"]["m"] == 8 and "sampler" not in applied
    cfg, applied = resolve({"sampler": {"name": "random"}}, reg)
    assert "m" not in cfg["sampler"] and "sampler" not in applied
    cfg, applied = resolve({"dataset": {"name": "omniglot", "root": str(tmp_path)}}, reg)
    assert cfg["sampler"]["m"] == 4 and applied == {}  # omniglot recommends nothing
    # the run says what it took, and saves it in its config
    code, out, err = cli("train", "--epochs", "1", "--run-dir", str(tmp_path / "r"))
    assert code == 0, err
    assert 'recommended settings in use (yours win): sampler.m=16, train.val_split="samples"' in out
    assert "m = 16" in (tmp_path / "r" / "config.toml").read_text()
    code, out, _ = cli("show", "dataset", "digits")
    assert code == 0 and "sampler.m=16" in out


def test_pretrained_backbone_recommends_the_fine_tuning_recipe():
    from dmlkit.config import resolve

    reg = get_host().registry
    cfg, applied = resolve({"backbone": {"name": "efficientnet_lite0"}}, reg)
    recipe = applied["train"]
    assert recipe["freeze_bn"] is True and recipe["pooling"] == "avgmax"
    assert recipe["embedding_size"] == 1280 and recipe["head_init"] == "identity"
    assert cfg["train"]["backbone_lr_multiplier"] == recipe["backbone_lr_multiplier"] < 1
    assert cfg["loss"]["name"] == "proxy_anchor" and cfg["loss"]["proxy_init"] == "class_means"
    assert applied["loss"] == {"name": "proxy_anchor", "proxy_init": "class_means"}
    # the user's own loss choice wins, and keeps the recommended option it takes
    cfg, applied = resolve({"backbone": {"name": "efficientnet_lite0"}, "loss": {"name": "proxy_nca"}}, reg)
    assert cfg["loss"]["name"] == "proxynca" and applied["loss"] == {"proxy_init": "class_means"}
    user = {"backbone": {"name": "efficientnet_lite0"}, "train": {"embedding_size": 512, "head_init": "random"}}
    cfg, applied = resolve(user, reg)
    assert cfg["train"]["embedding_size"] == 512 and "embedding_size" not in applied["train"]
    # a loss without proxies is not handed proxy_init
    cfg, applied = resolve({"backbone": {"name": "efficientnet_lite0"}, "loss": {"name": "triplet"}}, reg)
    assert "proxy_init" not in cfg["loss"] and "loss" not in applied
    # trained from scratch, nothing to preserve: no recipe
    cfg, applied = resolve({"backbone": {"name": "efficientnet_lite0", "pretrained": False}}, reg)
    assert set(applied.get("train", {})) <= {"val_split"} and cfg["train"]["embedding_size"] == 128


def test_eval_at_start_records_the_untrained_model_as_epoch_0(cli, tmp_path):
    from dmlkit.config import resolve
    from dmlkit.train import Trainer

    run = tmp_path / "r"
    (tmp_path / "r").mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 7}\n')  # left by a run killed before its first checkpoint
    code, out, err = cli("train", "--epochs", "2", "--set", "eval_at_start=true", "--run-dir", str(run))
    assert code == 0, err
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [0, 1, 2] and rows[0]["loss"] is None
    # epoch 0 is the model as built, before any step: an independent trainer, same seed, no training
    cfg, _ = resolve({}, get_host().registry)
    fresh = Trainer(cfg, get_host().registry, tmp_path / "u")
    untrained = fresh.evaluate(fresh.val_split)
    assert rows[0]["val_map_at_r"] == pytest.approx(untrained["map_at_r"], abs=1e-6)
    assert all(abs(r["val_map_at_r"] - rows[0]["val_map_at_r"]) > 1e-3 for r in rows[1:])  # not a trained epoch


def test_identity_head_starts_at_the_pooled_features():
    from dmlkit.errors import OptionError
    from dmlkit.model import EmbeddingHead

    x = torch.randn(3, 16, 5, 5)
    head = EmbeddingHead(16, 16, pooling="avgmax", init="identity")
    pooled = x.mean((2, 3)) + x.amax((2, 3))
    torch.testing.assert_close(head(x), torch.nn.functional.normalize(pooled, dim=1))
    assert head.linear.weight.requires_grad  # it trains from there
    with pytest.raises(OptionError, match="needs embedding_size equal to the backbone's 16 features"):
        EmbeddingHead(16, 8, init="identity")


def test_a_broken_recommendation_names_its_component():
    from dmlkit import ComponentSpec
    from dmlkit.config import resolve
    from dmlkit.registry import Registry

    reg = Registry()
    for kind, spec in get_host().registry:
        reg.add(kind, spec, spec.plugin)
    reg.add("backbone", ComponentSpec("oops", lambda: torch.nn.Identity(), recommends=lambda opts: 1 / 0), "p1")
    with pytest.raises(DmlkitError, match="'oops' \\(plugin 'p1'\\) failed to give its recommended settings: Zero"):
        resolve({"backbone": {"name": "oops"}}, reg)


def load_run_sizes(run):
    """The sizes of a run's full training split, validation split and test split."""
    from dmlkit.train import load_run

    trainer = load_run(run)
    return [len(trainer.full_train_split), len(trainer.val_split), len(trainer.test_split)]


def train_with_and_without_the_cache(cli, tmp_path, common):
    """Two runs with the settings ``common``: ``plain`` and ``c`` (feature cache under ``cache``);
    their metrics.jsonl rows and the cache folder."""
    cache = tmp_path / "cache"
    assert cli("train", *common, "--run-dir", str(tmp_path / "plain"))[0] == 0
    code, _, err = cli(
        "train", *common, "--set", "feature_cache=true", "--set", f"cache_dir={cache}", "--run-dir", str(tmp_path / "c")
    )
    assert code == 0, err
    return read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "c"), cache


def test_feature_cache_trains_exactly_as_the_uncached_frozen_backbone(cli, tmp_path):
    """The frozen-backbone fast path: same losses, validation and test metrics as running the frozen
    backbone every step (digits has no augmentation), and its files are reused by another run."""
    common = ["--epochs", "3", "--set", "freeze_backbone=true"]
    a, b, cache = train_with_and_without_the_cache(cli, tmp_path, common)
    for key in ("loss", "val_map_at_r"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], abs=1e-6), key
    for key in ("precision_at_1", "map_at_r"):
        assert read_results(tmp_path / "c")["test"][key] == pytest.approx(read_results(tmp_path / "plain")["test"][key])
    files = sorted(cache.iterdir())
    assert len(files) == 3  # training view, validation images, test
    sizes = sorted(len(torch.load(f, weights_only=True)) for f in files)
    trainer_sizes = load_run_sizes(tmp_path / "c")
    assert sizes == sorted(trainer_sizes)  # only the images a split needs: no training image embedded twice
    stamps = [f.stat().st_mtime_ns for f in files]
    # another validation split (and, for a pretrained backbone, another seed): the training view and the
    # test files are reused, not recomputed; only its validation images are embedded
    code, _, err = cli(
        "train", *common, "--set", "val_fraction=0.3", "--set", "feature_cache=true", "--set", f"cache_dir={cache}",
        "--run-dir", str(tmp_path / "c1"),
    )  # fmt: skip
    assert code == 0, err
    after = sorted(cache.iterdir())
    assert len(after) == 4 and set(files) < set(after)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    # the backbone is frozen: it is not in the optimizer
    groups = load_checkpoint(tmp_path / "c")["optimizer"]["param_groups"]
    assert not any(g["name"] == "backbone" for g in groups)
    code, _, err = cli("train", "--set", "feature_cache=true", "--run-dir", str(tmp_path / "x"))
    assert code == 1 and "needs a frozen backbone" in err


def test_a_backbone_frozen_up_to_a_stage_trains_the_same_with_and_without_the_feature_cache(cli, tmp_path):
    """freeze_backbone = a stage: the first block's output is cached, the later blocks and the head
    train on it, with the same losses and metrics as running the frozen block every step; the frozen
    block gets no gradient and is not in the optimizer; the later blocks change."""
    common = ["--epochs", "2", "--set", "freeze_backbone=block1"]
    a, b, cache = train_with_and_without_the_cache(cli, tmp_path, common)
    for key in ("loss", "val_map_at_r"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], abs=1e-5), key
    from dmlkit.config import resolve
    from dmlkit.train import Trainer

    cfg, _ = resolve({"train": {"freeze_backbone": "block1", "epochs": 2}}, get_host().registry)
    start = Trainer(cfg, get_host().registry, tmp_path / "unused").model.state_dict()  # the runs' initial weights
    for run in ("plain", "c"):
        weights = load_checkpoint(tmp_path / run)["model"]
        block1 = [k for k in weights if k.startswith("backbone.body.0.") and weights[k].is_floating_point()]
        later = [k for k in weights if k.startswith("backbone.body.4.") and weights[k].is_floating_point()]
        assert block1 and later
        assert all(torch.equal(weights[k], start[k]) for k in block1)
        assert not all(torch.equal(weights[k], start[k]) for k in later)
    names = [g["name"] for g in load_checkpoint(tmp_path / "c")["optimizer"]["param_groups"]]
    assert "backbone" in names  # the later blocks train
    feats = torch.load(next(cache.iterdir()), weights_only=True)
    assert feats.ndim == 4  # feature maps of block1, not pooled vectors


def test_freezing_up_to_a_stage_is_checked_before_any_work(cli, tmp_path):
    code, _, err = cli("train", "--set", "freeze_backbone=block9", "--run-dir", str(tmp_path / "a"))
    assert code == 1 and "is not a stage of the backbone" in err and "block1" in err
    assert not (tmp_path / "a").exists()
    code, _, err = cli("train", "--set", "freeze_backbone=block4", "--run-dir", str(tmp_path / "b"))
    assert code == 1 and "is the last stage" in err and "write true" in err
    # a number is not a stage name (0 and 1 would read as false and true): refused, not frozen at stage 0
    for number in ("0", "1"):
        code, _, err = cli("train", "--set", f"freeze_backbone={number}", "--run-dir", str(tmp_path / "c"))
        assert code == 1 and "freeze_backbone" in err and not (tmp_path / "c").exists()


def test_a_feature_cache_larger_than_memory_is_refused(monkeypatch, tmp_path):
    from dmlkit import features
    from dmlkit.config import resolve
    from dmlkit.train import Trainer

    monkeypatch.setattr(features, "available_memory", lambda: 2**20)  # 1 MiB
    cfg, _ = resolve({"train": {"freeze_backbone": "block1", "feature_cache": True, "epochs": 1}}, get_host().registry)
    with pytest.raises(DmlkitError, match="stage 'block1'.*needs .* GiB, more than half"):
        Trainer(cfg, get_host().registry, tmp_path / "r")


def test_printed_numbers_have_one_format_in_and_out_of_a_terminal(tmp_path):
    """The epoch table, the progress bar and the summaries print each value the same way whether
    or not the output is a terminal; the progress bar shows '-' (not 0) before the first step."""
    import io
    import re

    from rich.console import Console

    from dmlkit.console import fmt
    from dmlkit.train import Trainer

    assert [fmt("images_per_s", 3950.7), fmt("epoch_time_s", 2.345), fmt("loss", 0.80544)] == ["3951", "2.3", "0.8054"]
    assert [fmt("loss", 1234.5), fmt("loss", 1.5e-5), fmt("map_at_r", 0.91614), fmt("x", None)] == [
        "1234", "1.5e-05", "0.9161", "-",
    ]  # fmt: skip
    outputs = {}
    for terminal in (True, False):
        buf = io.StringIO()
        from dmlkit.config import resolve

        cfg, _ = resolve({"train": {"epochs": 1}}, get_host().registry)
        trainer = Trainer(cfg, get_host().registry, tmp_path / f"t{terminal}",
                          console=Console(file=buf, force_terminal=terminal, width=200))  # fmt: skip
        trainer.fit()
        text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buf.getvalue())
        outputs[terminal] = text
        record = trainer.history[-1]
        if terminal:  # a table in a terminal, one line in a log
            row = rf"│\s*{fmt('loss', record['loss'])} │\s*{fmt('images_per_s', record['images_per_s'])} │"
        else:
            row = (
                rf"epoch 1/1: loss {fmt('loss', record['loss'])}, img/s {fmt('images_per_s', record['images_per_s'])}, "
            )
        assert re.search(row, text), text
    assert "loss -  img/s -" in outputs[True] and "img/s 0 " not in outputs[True]
    assert "img/s" not in outputs[False].split("epoch 1")[0]  # no progress bar when not a terminal
    # every phase that can take a while has its own bar in a terminal: validation, the test read
    for phase in ("embedding the validation images", "embedding the test images", "test embeddings (retrieval)"):
        assert phase in outputs[True] and phase not in outputs[False]
