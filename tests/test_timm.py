"""The timm backbone: tiny timm models (random weights, or weights from a local file), offline."""

import json
import sys

import pytest
import torch

from dmlkit import get_registry
from dmlkit.config import resolve
from dmlkit.data import image_transforms
from dmlkit.errors import DmlkitError

timm = pytest.importorskip("timm", reason="pip install 'dmlkit[timm]'")

TINY = {"model": "test_resnet", "pretrained": False, "in_chans": 1}  # 96 features, ~0.4M parameters


def build(**options):
    return get_registry().build("backbone", "timm", **options)


def embed(net, x):
    net.eval()
    with torch.no_grad():
        return net(x)


def test_a_timm_model_trains_on_digits_from_the_cli(cli, tmp_path):
    run = tmp_path / "run"
    args = ["--backbone", "timm", *(f"--backbone-opt={k}={str(v).lower()}" for k, v in TINY.items())]
    code, out, err = cli("train", *args, "--epochs", "1", "--run-dir", str(run))
    assert code == 0, err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["loss"] > 0 and 0 <= rows[0]["val_map_at_r"] <= 1
    assert 'name = "timm"' in (run / "config.toml").read_text()
    assert json.loads((run / "results.json").read_text())["test"]["precision_at_1"] > 0.2
    # the run's checkpoint is a weights file too: its backbone comes back exactly
    trained = torch.load(run / "last.pt", weights_only=True)["model"]
    net = build(**TINY, weights_path=str(run / "last.pt"))
    for key, value in net.model.state_dict().items():
        torch.testing.assert_close(value, trained[f"backbone.model.{key}"])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_weights_path_gives_the_embeddings_of_the_model_that_saved_it(tmp_path, suffix):
    torch.manual_seed(0)
    saver = build(**TINY)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(saver.model.state_dict(), str(path))
    else:
        torch.save(saver.model.state_dict(), path)
    torch.manual_seed(1)
    random = build(**TINY)
    torch.manual_seed(1)
    loaded = build(**TINY, weights_path=str(path))
    x = torch.randn(4, 1, 32, 32)
    assert embed(loaded, x).shape == (4, 96) and loaded.out_features == 96
    torch.testing.assert_close(embed(loaded, x), embed(saver, x))
    assert not torch.allclose(embed(random, x), embed(loaded, x))  # the weights changed the embeddings


def test_weights_that_do_not_fit_are_one_line_errors(tmp_path):
    torch.save(build(model="test_efficientnet", pretrained=False).model.state_dict(), tmp_path / "other.pth")
    with pytest.raises(DmlkitError, match="do not fit timm model 'test_resnet'") as err:
        build(model="test_resnet", weights_path=str(tmp_path / "other.pth"))
    assert "\n" not in str(err.value)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "stranger.pth")
    with pytest.raises(DmlkitError, match="do not fit timm model 'test_resnet'"):
        build(model="test_resnet", weights_path=str(tmp_path / "stranger.pth"))
    with pytest.raises(DmlkitError, match="weights file not found"):
        build(model="test_resnet", weights_path=str(tmp_path / "nope.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"not a file of tensors")
    with pytest.raises(DmlkitError, match="cannot read weights file"):
        build(model="test_resnet", weights_path=str(tmp_path / "bad.safetensors"))


def test_pretrained_weights_come_from_the_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    def no_network(*args, **kwargs):
        raise AssertionError("dmlkit asked the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr("timm.models._hub.hf_hub_download", no_network, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    with pytest.raises(DmlkitError, match=r"not in the local cache .*timm/test_resnet\.r160_in1k.*weights_path") as err:
        build(model="test_resnet.r160_in1k")  # pretrained=True is the default
    assert "\n" not in str(err.value)
    # as `hf download` leaves it: the file under snapshots/<commit>/, refs/main naming the commit
    torch.manual_seed(0)
    saver = build(model="test_resnet", pretrained=False)
    repo = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    from safetensors.torch import save_file

    save_file(saver.model.state_dict(), str(repo / "snapshots" / "abc123" / "model.safetensors"))
    torch.manual_seed(1)
    net = build(model="test_resnet.r160_in1k")
    x = torch.randn(2, 3, 40, 40)
    torch.testing.assert_close(embed(net, x), embed(saver, x))


def test_input_spec_is_the_model_config(tmp_path):
    net = build(model="resnet10t", pretrained=False)
    cfg = net.model.pretrained_cfg
    assert net.input_spec == {
        "channels": 3,
        "image_size": cfg["input_size"][-1],
        "mean": tuple(cfg["mean"]),
        "std": tuple(cfg["std"]),
        "interpolation": cfg["interpolation"],
        "crop_pct": cfg["crop_pct"],
    }
    assert (cfg["mean"], cfg["interpolation"], cfg["crop_pct"]) == ((0.485, 0.456, 0.406), "bicubic", 0.875)
    # the datasets' transforms follow it: resize to size / crop_pct, bicubic, then the centre crop
    test = image_transforms(net.input_spec, train=False)
    resize = test.transforms[0]
    assert resize.size == round(176 / 0.875) and resize.interpolation.value == "bicubic"
    assert tuple(test.transforms[-1].mean) == (0.485, 0.456, 0.406)
    gray = build(model="resnet10t", pretrained=False, in_chans=1, image_size=64)
    assert gray.input_spec["channels"] == 1 and gray.input_spec["image_size"] == 64
    assert gray.input_spec["mean"] == pytest.approx((sum(cfg["mean"]) / 3,))


def test_a_vit_gives_one_vector_and_takes_another_image_size():
    net = build(model="test_vit", pretrained=False, image_size=64)
    assert net.input_spec["image_size"] == 64 and net.input_spec["mean"] == (0.5, 0.5, 0.5)
    out = embed(net, torch.randn(2, 3, 64, 64))
    assert out.shape == (2, net.out_features) == (2, 64)  # the model's own pooling of the tokens
    with pytest.raises(DmlkitError, match="feature_maps=true needs"):
        build(model="test_vit", pretrained=False, feature_maps=True)
    cnn = build(model="test_resnet", pretrained=False, feature_maps=True)
    assert embed(cnn, torch.randn(2, 3, 64, 64)).shape == (2, 96, 2, 2)  # maps, pooled by dmlkit's head


def test_missing_timm_and_a_bad_name_are_one_line_errors(cli, monkeypatch, tmp_path):
    code, _, err = cli("train", "--backbone", "timm", "--backbone-opt", "model=test_resnt", "--run-dir", str(tmp_path))
    assert code == 1 and "unknown timm model 'test_resnt'; did you mean 'test_resnet'" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(DmlkitError, match="has no pretrained tag 'r16_in1k'; did you mean 'test_resnet.r160_in1k'"):
        build(model="test_resnet.r16_in1k")
    with pytest.raises(DmlkitError, match="needs model=NAME"):
        build()
    monkeypatch.setitem(sys.modules, "timm", None)
    code, _, err = cli("train", "--backbone", "timm", "--backbone-opt", "model=resnet50", "--run-dir", str(tmp_path))
    assert code == 1 and "needs the timm package: pip install 'dmlkit[timm]'" in err
    assert len(err.strip().splitlines()) == 1


def test_pretrained_weights_bring_the_fine_tuning_recipe(tmp_path):
    torch.save(build(model="test_resnet", pretrained=False).model.state_dict(), tmp_path / "w.pth")
    backbone = {"name": "timm", "model": "test_resnet", "weights_path": str(tmp_path / "w.pth")}
    cfg, applied = resolve({"backbone": backbone}, get_registry())
    assert applied["train"]["embedding_size"] == 96 and cfg["train"]["head_init"] == "identity"
    assert cfg["train"]["backbone_lr_multiplier"] == 0.1 and cfg["loss"]["name"] == "proxy_anchor"
    assert "pooling" not in applied["train"]  # pooled by the model itself
    cfg, applied = resolve({"backbone": {**backbone, "feature_maps": True}}, get_registry())
    assert applied["train"]["pooling"] == "avgmax"
    _, applied = resolve({"backbone": {"name": "timm", "model": "test_resnet", "pretrained": False}}, get_registry())
    assert "train" not in applied or "head_init" not in applied["train"]


def test_backbone_page_commands_run(cli, tmp_path, monkeypatch):
    from conftest import ROOT
    from test_docs import run_dmlkit_lines

    monkeypatch.chdir(tmp_path)
    assert run_dmlkit_lines(ROOT / "docs" / "components" / "backbone.md", cli) == 1
    assert (tmp_path / "runs" / "timm-digits" / "results.json").is_file()


@pytest.mark.parametrize("model", ["test_resnet", "test_convnext", "test_efficientnet"])
def test_a_timm_models_stages_compose_to_its_forward(model):
    """dmlkit cuts a timm model at its feature_info stages (traced with torch.fx): the stages in a
    chain give the model's forward output and share its parameters."""
    from dmlkit.model import backbone_stages

    torch.manual_seed(0)
    net = build(model=model, pretrained=False).eval()
    x = torch.randn(2, 3, 160, 160)
    stages = backbone_stages(net)
    assert len(stages) >= 2
    chained = x
    with torch.no_grad():
        for _, stage in stages:
            chained = stage(chained)
        torch.testing.assert_close(chained, embed(net, x))
    owned = {id(p) for p in net.parameters()}
    assert all(id(p) in owned for _, s in stages for p in s.parameters())
