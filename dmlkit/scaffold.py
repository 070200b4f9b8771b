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

import torch

import dmlkit
from dmlkit.losses import MetricLoss, cosine_similarity, label_masks


class {cls}(MetricLoss):
    """Cosine contrastive loss: positives pulled to similarity 1, negatives pushed below ``margin``.

    Mean over positive pairs of (1 - s) plus mean over negative pairs of [s - margin]+.
    Replace the body of ``forward`` with your own loss; keep the signature.

    Args:
        margin: negative pairs less similar than this cost nothing.
    """

    def __init__(self, margin: float = 0.5):
        super().__init__()  # losses are torch.nn.Modules: call this first
        self.margin = margin

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, indices=None):
        ref = embeddings if ref_embeddings is None else ref_embeddings
        sim = cosine_similarity(embeddings.float(), ref.float())
        pos, neg = label_masks(labels, ref_labels)  # an item is never its own pair
        pull = (1 - sim)[pos].mean() if pos.any() else sim.sum() * 0
        push = (sim - self.margin).clamp(min=0)[neg].mean() if neg.any() else sim.sum() * 0
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

Edit `{module}.py`: the loss's `forward`, its options (typed keyword arguments with defaults,
documented under `Args:`), and the `ComponentSpec` that registers it.
"""


def new_plugin(name: str, parent: Path) -> Path:
    """Write the package ``dmlkit-NAME`` into ``parent / f"dmlkit-{name}"`` and return its folder."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise DmlkitError(
            f"plugin name {name!r} must be a lower-case Python identifier (letters, digits, _), e.g. my_loss"
        )
    target = parent / f"dmlkit-{name.replace('_', '-')}"
    if target.exists():
        raise DmlkitError(f"{target} already exists; choose another name or --dir")
    module = f"dmlkit_{name}"
    cls = "".join(part.capitalize() for part in name.split("_")) + "Loss"
    values = {"name": name, "dist": name.replace("_", "-"), "module": module, "cls": cls}
    files = {
        "pyproject.toml": PYPROJECT,
        f"{module}.py": MODULE,
        "tests/test_plugin.py": TEST,
        "README.md": README,
    }
    for rel, template in files.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**values))
    return target
