import pytest
import torch

from dmlkit import ComponentSpec
from dmlkit.errors import ClashError, DmlkitError, OptionError, UnknownComponentError
from dmlkit.registry import Registry


def factory(num_classes: int, margin: float = 0.2, squared: bool = True, mode: str = "a"):
    return {"num_classes": num_classes, "margin": margin, "squared": squared, "mode": mode}


def registry():
    r = Registry()
    r.add("loss", ComponentSpec("my_loss", factory, "A loss", defaults={"margin": 0.3}, aliases=("ml",)), plugin="p1")
    r.add("loss", ComponentSpec("other", factory), plugin="p1")
    return r


def test_build_merges_defaults_options_and_context():
    r = registry()
    out = r.build("loss", "my_loss", context={"num_classes": 7, "unused": 1}, squared=False)
    assert out == {"num_classes": 7, "margin": 0.3, "squared": False, "mode": "a"}
    assert r.build("loss", "ml", context={"num_classes": 2})["margin"] == 0.3  # alias
    # an int is fine where a float is expected, and is converted
    assert r.build("loss", "my_loss", num_classes=3, margin=1)["margin"] == 1.0


def test_unknown_name_suggests_closest():
    with pytest.raises(UnknownComponentError, match=r"unknown loss 'my_los'; did you mean 'my_loss'"):
        registry().get("loss", "my_los")


def test_unknown_kind_suggests_closest():
    with pytest.raises(UnknownComponentError, match=r"unknown component kind 'losss'; did you mean 'loss'"):
        registry().get("losss", "x")


def test_unknown_option_lists_valid_ones():
    with pytest.raises(OptionError) as e:
        registry().build("loss", "my_loss", num_classes=2, margn=0.1)
    msg = str(e.value)
    assert "has no option 'margn'" in msg and "did you mean 'margin'" in msg
    assert "valid options: margin, mode, num_classes, squared" in msg


def test_wrong_type_is_refused():
    with pytest.raises(OptionError, match="option 'margin' must be float, got 'big'"):
        registry().build("loss", "my_loss", num_classes=2, margin="big")
    with pytest.raises(OptionError, match="option 'squared' must be bool"):
        registry().build("loss", "my_loss", num_classes=2, squared=1)


def test_missing_required_option():
    with pytest.raises(OptionError, match="needs option 'num_classes'"):
        registry().build("loss", "my_loss")


def test_clash_names_both_plugins_and_blocks_the_name():
    r = registry()
    with pytest.raises(ClashError, match="registered by both plugin 'p1' and plugin 'p2'"):
        r.add("loss", ComponentSpec("my_loss", factory), plugin="p2")
    with pytest.raises(ClashError, match="'p1' and plugin 'p2'"):  # an alias clashes too
        r.add("loss", ComponentSpec("new", factory, aliases=("other",)), plugin="p2")


def test_replaces_takes_over_explicitly():
    r = registry()
    r.add("loss", ComponentSpec("my_loss2", lambda: "new", replaces="my_loss"), plugin="p2")
    assert "my_loss" not in r.names("loss")
    with pytest.raises(DmlkitError, match="which no plugin registered"):
        r.add("loss", ComponentSpec("x", factory, replaces="nope"), plugin="p3")


def test_factory_failure_names_plugin():
    r = Registry()

    def broken():
        raise RuntimeError("boom")

    r.add("miner", ComponentSpec("bad", broken), plugin="acme")
    with pytest.raises(DmlkitError, match=r"miner 'bad' \(plugin 'acme'\) failed to build: RuntimeError: boom"):
        r.build("miner", "bad")


def test_builtin_components_build_with_defaults():
    from dmlkit import get_registry

    reg = get_registry()
    loss = reg.build("loss", "proxynca", context={"num_classes": 4, "embedding_size": 8})
    assert loss.proxies.shape == (4, 8)
    assert loss.bank.lr_multiplier == 100.0
    miner = reg.build("miner", "semihard")
    a, p, n = miner(torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert len(a) == 8  # one triplet per positive pair
