"""``dmlkit new-plugin NAME``: a plugin package that installs, registers a loss and passes its own tests."""

from __future__ import annotations

import keyword
import re
from pathlib import Path

from dmlkit.errors import DmlkitError

PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "dmlkit-{dist}"
version = "0.1.0"
description = "A dmlkit plugin: the {name} loss"
requires-python = ">=3.11"
dependencies = ["dmlkit"]

[project.optional-dependencies]
test = ["pytest>=8"]

# dmlkit finds the plugin through this entry point (group "dmlkit")
[project.entry-points.dmlkit]
{name} = "{module}"

[tool.setuptools]
py-modules = ["{module}"]
"""

MODULE = '''\
"""The {name} loss, a dmlkit plugin (written by `dmlkit new-plugin`)."""

import dmlkit
from dmlkit.losses import MetricLoss, cosine_similarity, pair_masks, zero_loss


class {cls}(MetricLoss):
    """Cosine contrastive loss: positives pulled to similarity 1, negatives pushed below ``margin``.

    Mean over positive pairs of (1 - s) plus mean over negative pairs of [s - margin]+.
    Replace the body of ``compute`` with your own loss: ``MetricLoss.forward`` calls it in float32
    (also under mixed precision), with ``ref``/``ref_labels`` (a reference set, or None: the batch
    against itself) and ``indices`` (a miner's pairs or triplets, or None: every pair).

    Args:
        margin: negative pairs less similar than this cost nothing.
    """

    def __init__(self, margin: float = 0.5):
        super().__init__()  # losses are torch.nn.Modules: call this first
        self.margin = margin

    def compute(self, emb, labels, ref, ref_labels, indices):
        other = emb if ref is None else ref
        sim = cosine_similarity(emb, other)
        # same-class / different-class pairs (an item is never its own pair), only the mined ones if a miner ran
        pos, neg = pair_masks(labels, ref_labels, indices, len(emb), len(other), emb.device)
        pull = (1 - sim)[pos].mean() if pos.any() else zero_loss(emb, other)
        push = (sim - self.margin).clamp(min=0)[neg].mean() if neg.any() else zero_loss(emb, other)
        return pull + push


@dmlkit.hookimpl
def register_losses(register):
    register(dmlkit.ComponentSpec("{name}", {cls}, "Cosine contrastive loss (from dmlkit new-plugin)"))
'''

TEST = '''\
"""Tests of the {name} plugin: run them with `python -m pytest`."""

import torch

import {module}
from dmlkit.testing import check_plugin


def test_the_plugin_registers_builds_and_trains():
    # registers beside the built-ins, builds with its defaults, returns a finite scalar that back-propagates
    report = check_plugin({module}, name="{name}")
    assert report.components == {{"loss": ["{name}"]}}


def test_only_the_mined_pairs_count():
    loss = {module}.{cls}(margin=0.5)
    labels = torch.tensor([0, 0, 1, 1])
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.0, 1.0]])
    # a miner's pairs (anchor, positive, anchor, negative): only items 1 and 3, which point the same way
    mined = (torch.tensor([0]), torch.tensor([1]), torch.tensor([1]), torch.tensor([3]))
    want = 1 + (1 - 0.5)  # the positive pair is orthogonal (s = 0), the negative pair identical (s = 1)
    assert abs(float(loss(emb, labels, indices=mined)) - want) < 1e-6
    assert abs(float(loss(emb, labels)) - want) > 1e-3  # every pair gives another value


def test_separated_classes_cost_nothing_and_mixed_ones_do():
    loss = {module}.{cls}(margin=0.5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    separated = torch.eye(3)[labels] * 2.0  # same class: same direction; classes orthogonal
    assert float(loss(separated, labels)) == 0.0
    mixed = separated.flip(0)  # the pairs now point at another class
    assert float(loss(mixed, torch.tensor([0, 1, 1, 2, 2, 0]))) > 0.1
'''

README = """\
# dmlkit-{dist}

A [dmlkit](https://pypi.org/project/dmlkit/) plugin with one loss, `{name}`.

```bash
pip install -e ".[test]"        # registers the plugin through its entry point
python -m pytest                # its tests, with dmlkit.testing.check_plugin
dmlkit list loss                # {name} is listed, from plugin {name}
dmlkit show loss {name}         # its options and docstring
dmlkit train --loss {name} --epochs 2
```

Edit `{module}.py`: the loss's `compute`, its options (typed keyword arguments with defaults,
documented under `Args:`), and the `ComponentSpec` that registers it.
"""


#: Module names a plugin's name must never shadow, whether or not they import from here.
RESERVED = {"dmlkit", "dmlkit_plugins", "plugins", "tests", "test", "conftest", "setup"}
MAX_NAME = 60


def name_problem(name: str) -> str:
    """Why ``name`` cannot be a new plugin's name ("" when it can): not a lower-case identifier, a
    module it or its module ``dmlkit_NAME`` would shadow (dmlkit's own, the standard library's, any
    installed top-level module), a plugin of that name, or a registered loss of that name."""
    import importlib.util
    import sys

    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name) or len(name) > MAX_NAME:
        return f"must be a lower-case Python identifier of at most {MAX_NAME} characters (letters, digits, _)"
    for module in (name, f"dmlkit_{name}"):
        if module in RESERVED or module in sys.stdlib_module_names:
            where = "dmlkit's own" if module in RESERVED else "a standard library module"
            return f"would shadow the module '{module}' ({where})"
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is not None:
            return f"would shadow the installed module '{module}' ({found.origin or 'a namespace package'})"
    from dmlkit.plugins import get_host

    host = get_host()
    for plugin, info in host.plugins.items():
        if plugin == name:
            return f"is the name of the plugin from {info.distribution or info.module}"
    if ("loss", name) in host.registry:
        spec = host.registry.get("loss", name)
        return f"is taken by the loss '{spec.name}' of plugin '{spec.plugin}'"
    return ""


def new_plugin(name: str, parent: Path) -> Path:
    """Write the package ``dmlkit-NAME`` into ``parent / f"dmlkit-{name}"`` and return its folder.

    The files are written into a temporary folder beside it and renamed into place: a failure or
    an interrupt leaves nothing behind."""
    import os
    import secrets
    import shutil

    from dmlkit import interrupts

    valid = re.fullmatch(r"[a-z][a-z0-9_]*", name) and not keyword.iskeyword(name) and len(name) <= MAX_NAME
    if valid and parent.exists() and not parent.is_dir():
        raise DmlkitError(f"--dir {parent} is a file; --dir names the folder to write the package into")
    target = parent / f"dmlkit-{name.replace('_', '-')}"
    if valid and (target.exists() or target.is_symlink()):  # first: the package may be this one, installed
        raise DmlkitError(f"{target} already exists; choose another name or --dir")
    problem = name_problem(name)
    if problem:
        suggestion = next(
            (
                alt
                for alt in (f"my_{name}", f"{name}_loss", f"{name}2")
                if re.fullmatch(r"[a-z]\w*", alt) and not name_problem(alt)
            ),
            "my_loss",
        )
        raise DmlkitError(f"plugin name {name!r} {problem}; pick another name, e.g. {suggestion}")
    module = f"dmlkit_{name}"
    cls = "".join(part.capitalize() for part in name.split("_")) + "Loss"
    values = {"name": name, "dist": name.replace("_", "-"), "module": module, "cls": cls}
    files = {
        "pyproject.toml": PYPROJECT,
        f"{module}.py": MODULE,
        "tests/test_plugin.py": TEST,
        "README.md": README,
    }
    made = [p for p in [parent, *parent.parents] if not p.exists()]
    tmp = None
    try:
        for folder in reversed(made):
            folder.mkdir()
        tmp = parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()  # a new name: never one that holds anything
        for rel, template in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(template.format(**values), encoding="utf-8")
        with interrupts.deferred():
            if target.exists():  # made since the check
                raise DmlkitError(f"{target} already exists; choose another name or --dir")
            tmp.rename(target)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:
            try:
                folder.rmdir()  # only if empty
            except OSError:
                pass
        if isinstance(exc, OSError):
            from dmlkit.rundir import writable_error

            raise writable_error(target, exc, "package folder") from None
        raise
    return target
