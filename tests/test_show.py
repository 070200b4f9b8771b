"""`dmlkit show`: options with type, default and help; nested components' options; the docstring as written."""

import json

import dmlkit
from dmlkit import get_registry
from dmlkit.registry import option_help


def test_show_prints_the_docstring_literally(cli, monkeypatch):
    import dmlkit.cli

    monkeypatch.setattr(dmlkit.cli.console, "width", 200)
    code, out, _ = cli("show", "loss", "triplet")
    assert code == 0 and "[d(a,p) - d(a,n) + margin]+" in out  # rich markup would eat the brackets


def test_show_gives_each_option_its_type_default_and_help(cli):
    code, out, _ = cli("show", "loss", "triplet", "--json")
    info = json.loads(out)["option_info"]
    assert info["margin"] == {
        "name": "margin", "type": "float", "default": 0.2, "required": False,
        "help": "the margin between positive and negative distances.",
    }  # fmt: skip
    assert info["squared"]["type"] == "bool" and info["reduction"]["type"] == "str"
    code, out, _ = cli("show", "loss", "proxynca", "--json")
    info = json.loads(out)["option_info"]
    assert info["num_classes"]["required"] and info["proxy_init"]["type"] == "str | dict"


def test_show_lists_nested_options_under_the_dotted_names_the_cli_sets(cli, tmp_path):
    code, out, _ = cli("show", "loss", "ccp", "--json")
    nested = {g["option"]: g for g in json.loads(out)["nested"]}
    base = nested["base_options"]
    assert (base["kind"], base["component"]) == ("loss", "contrastive")
    contrastive = get_registry().get("loss", "contrastive").resolved_defaults()
    assert {r["name"]: r["default"] for r in base["options"]} == {
        f"base_options.{k}": v for k, v in contrastive.items()
    }
    init = nested["initializer"]
    assert init["component"] == "greedy_kcenter" and "initializer.seed_with_previous" in {
        r["name"] for r in init["options"]
    }
    # the dotted name shown is the one a run accepts
    code, _, err = cli("train", "--loss", "ccp", "--loss-opt", "base_options.neg_margin=0.3", "--epochs", "1",
                       "--run-dir", str(tmp_path / "r"))  # fmt: skip
    assert code == 0, err
    assert "neg_margin = 0.3" in (tmp_path / "r" / "config.toml").read_text()


def test_option_help_reads_google_numpy_sphinx_and_prose():
    google = """Summary.

    Args:
        alpha: first line
            continued here.
        beta (int): the beta.

    Returns:
        nothing: not an option.
    """
    numpy_style = """Summary.

    Parameters
    ----------
    alpha : float
        the alpha.
    """
    sphinx = "Summary.\n\n:param alpha: the alpha.\n:param int beta: the beta.\n"
    prose = "Summary. The ``alpha`` option scales things. Nothing about the other."
    import inspect

    assert option_help(inspect.cleandoc(google), ["alpha", "beta", "nothing"]) == {
        "alpha": "first line continued here.", "beta": "the beta.", "nothing": "",
    }  # fmt: skip
    assert option_help(inspect.cleandoc(numpy_style), ["alpha"]) == {"alpha": "the alpha."}
    assert option_help(sphinx, ["alpha", "beta"]) == {"alpha": "the alpha.", "beta": "the beta."}
    assert option_help(prose, ["alpha", "beta"]) == {"alpha": "The ``alpha`` option scales things.", "beta": ""}


def test_show_warns_about_a_default_that_does_not_fit_its_annotation(cli):
    from dmlkit.plugins import get_host

    def wrong(samples: int = "three"):
        """A factory with a wrong default."""

    get_host().registry.add("loss", dmlkit.ComponentSpec("wrong", wrong), plugin="acme")
    code, out, _ = cli("show", "loss", "wrong", "--json")
    assert json.loads(out)["problems"] == [
        "'wrong' (plugin 'acme'): the default of option 'samples' is 'three' (str) but its annotation says int; "
        "fix the default or the annotation"
    ]
