"""Koch's one-shot protocol (issue 27): groups of classes in a split (Omniglot's alphabets, read
here from the folder names), episodes drawn within one group against a brute-force episode loop on
the real Omniglot, and scoring by a loss's learned similarity against a loop written here."""

from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA

from dmlkit import get_registry
from dmlkit.data import Split
from dmlkit.errors import DataError

OMNIGLOT = SHARED_DATA / "omniglot"
needs_omniglot = pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"{OMNIGLOT} not present (real Omniglot)")


# ============================================================================ groups in a split
def test_split_groups_follow_subset_and_transform():
    labels = np.array([0, 0, 1, 1, 2, 2, 3])
    groups = np.array(["a", "a", "a", "a", "b", "b", "b"])
    split = Split(list(range(7)), labels, class_names=["w", "x", "y", "z"], groups=groups)
    sub = split.subset(np.array([6, 2, 4, 3]))
    assert sub.groups.tolist() == ["b", "a", "b", "a"]
    assert sub.labels.tolist() == [2, 0, 1, 0] and sub.class_names == ["x", "y", "z"]
    assert split.with_transform(None).groups is split.groups
    assert Split(list(range(7)), labels).subset(np.arange(3)).groups is None
    with pytest.raises(DataError, match="7 items but 6 groups"):
        Split(list(range(7)), labels, groups=groups[:6])


@needs_omniglot
def test_omniglot_groups_are_the_alphabet_folders():
    data = get_registry().build("dataset", "omniglot", root=str(OMNIGLOT))
    for split, alphabets in ((data.train, 30), (data.test, 20)):
        folders = np.array([Path(p).parent.parent.name for p in split.items])
        np.testing.assert_array_equal(split.groups, folders)
        assert len(np.unique(split.groups)) == alphabets
        for c in range(split.num_classes):  # a character belongs to one alphabet, named in its class name
            assert set(split.groups[split.labels == c]) == {split.class_names[c].split("/")[0]}
