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
    code, _, err = cli("show")
    assert code == 2 and "Missing argument" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("show", "loss")  # a kind without a name: what to type
    assert code == 1 and "dmlkit show loss NAME" in err and len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(cli):
    from dmlkit.errors import UnknownComponentError

    with pytest.raises(UnknownComponentError):
        cli("--debug", "show", "loss", "tripplet")


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "dmlkit", "list", "sampler", "--json"], capture_output=True, text=True)
    assert out.returncode == 0
    assert {c["name"] for c in json.loads(out.stdout)["sampler"]} == {
        "m_per_class",
        "random",
        "one_per_class",
        "two_views",
    }


def test_help_shows_no_value_for_flags_and_key_value_for_options(cli):
    code, out, _ = cli("evaluate", "--help")
    assert code == 0 and "--json" in out and "<bool>" not in out
    code, out, _ = cli("train", "--help")
    assert "<bool>" not in out and "<list[str]>" not in out and "KEY=VALUE" in out


def test_shell_completion_names_commands_and_components(tmp_path):
    """The completion script installs, and completing runs the real CLI: command names and the
    registered component names of the option being completed."""
    import os
    import subprocess
    import sys

    # typer detects the user's shell from the process tree; under a test runner there is none to find, so
    # the shell is named (typer's own switch for that)
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    code = subprocess.run(
        [sys.executable, "-m", "dmlkit", "--show-completion", "bash"], capture_output=True, text=True, timeout=120,
        env=env,
    )  # fmt: skip
    assert code.returncode == 0 and "_DMLKIT_COMPLETE=complete_bash" in code.stdout

    def complete(words, cword):
        env = {**os.environ, "_DMLKIT_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        proc = subprocess.run([sys.executable, "-m", "dmlkit"], env=env, capture_output=True, text=True, timeout=120)
        return proc.stdout.split()

    assert complete("dmlkit tr", 1) == ["train"]
    from dmlkit import get_registry

    losses = get_registry().names("loss")
    assert complete("dmlkit train --loss pro", 3) == sorted(n for n in losses if n.startswith("pro"))
    assert set(complete("dmlkit train --miner ", 3)) == set(get_registry().names("miner"))
