import json

import pytest

from dmlkit.registry import KINDS


def test_list_json_covers_every_kind_and_defaults(cli):
    code, out, _ = cli("list", "--json")
    data = json.loads(out)
    assert code == 0 and set(data) == set(KINDS)
    triplet = next(c for c in data["loss"] if c["name"] == "triplet")
    assert triplet["defaults"]["margin"] == 0.2 and triplet["plugin"] == "losses"


def test_list_accepts_plural_kind(cli):
    code, out, _ = cli("list", "miners", "--json")
    assert code == 0 and list(json.loads(out)) == ["miner"]


def test_show_gives_signature_defaults_and_owner(cli):
    code, out, _ = cli("show", "loss", "ms", "--json")  # by alias
    info = json.loads(out)
    assert info["name"] == "multi_similarity" and info["plugin"] == "losses" and info["distribution"] == "dmlkit"
    assert info["options"] == {"alpha": 2.0, "beta": 50.0, "base": 0.5, "normalize": True}
    code, out, _ = cli("show", "loss", "proxynca", "--json")
    assert json.loads(out)["required"] == ["num_classes", "embedding_size"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (("show", "loss", "tripplet"), "error: unknown loss 'tripplet'; did you mean 'triplet'"),
        (("list", "lossez"), "error: unknown component kind 'lossez'; did you mean 'loss'"),
        (("train", "--loss", "triplet", "--loss-opt", "margn=0.1"), "has no option 'margn'; did you mean 'margin'"),
        (("train", "--set", "lr=-1"), "train setting 'lr' must be > 0; got -1"),
        (("train", "--set", "epocs=2"), "unknown train setting 'epocs'; did you mean 'epochs'"),
        (("train", "--loss-opt", "scale"), "--loss-opt: expected key=value, got 'scale'"),
        (("evaluate", "--embeddings", "nope.npy", "--labels", "nope.npy"), "embeddings file not found: nope.npy"),
    ],
)
def test_user_errors_are_one_red_line(cli, argv, message):
    code, out, err = cli(*argv)
    assert code == 1
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_usage_error_is_one_line(cli):
    code, _, err = cli("show", "loss")
    assert code == 2 and "Missing argument" in err and len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(cli):
    from dmlkit.errors import UnknownComponentError

    with pytest.raises(UnknownComponentError):
        cli("--debug", "show", "loss", "tripplet")


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "dmlkit", "list", "sampler", "--json"], capture_output=True, text=True)
    assert out.returncode == 0
    assert {c["name"] for c in json.loads(out.stdout)["sampler"]} == {"m_per_class", "random", "one_per_class"}
