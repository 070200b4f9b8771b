import numpy as np
import pytest

from dmlkit.errors import OptionError
from dmlkit_plugins.samplers import MPerClassSampler, OnePerClassSampler, RandomSampler

LABELS = np.repeat(np.arange(10), [12, 3, 8, 8, 8, 8, 8, 8, 8, 2])  # two classes with fewer than M


def test_m_per_class_batches_and_epoch_length():
    s = MPerClassSampler(LABELS, batch_size=16, m=4, seed=1)
    s.set_epoch(3)
    batches = list(s)
    assert len(batches) == len(s) == len(LABELS) // 16
    for b in batches:
        classes, counts = np.unique(LABELS[b], return_counts=True)
        assert len(classes) == 4 and (counts == 4).all()  # small classes are sampled with replacement
    seen = {int(c) for b in batches for c in LABELS[b]}
    assert seen == set(range(10))  # the shuffled class cycle reaches every class
    assert batches == list(s)  # deterministic for (seed, epoch)
    s.set_epoch(4)
    assert batches != list(s)


@pytest.mark.parametrize(
    "make",
    [
        lambda r, w: MPerClassSampler(LABELS, batch_size=8, m=4, seed=0, rank=r, world_size=w),
        lambda r, w: RandomSampler(LABELS, batch_size=8, seed=0, rank=r, world_size=w),
        lambda r, w: OnePerClassSampler(LABELS, batch_size=5, seed=0, rank=r, world_size=w),
    ],
)
def test_ranks_get_disjoint_shares_of_the_single_process_batches(make):
    single = make(0, 1)
    single.set_epoch(2)
    everything = list(single)
    shares = []
    for rank in range(3):
        s = make(rank, 3)
        s.set_epoch(2)
        shares.append(list(s))
    assert len({len(x) for x in shares}) == 1  # equal share sizes: no rank waits for another
    for rank, share in enumerate(shares):
        assert share == everything[rank::3][: len(share)]


def test_bad_sampler_options():
    with pytest.raises(OptionError, match="must be a multiple of m"):
        MPerClassSampler(LABELS, batch_size=10, m=4)
    with pytest.raises(OptionError, match="classes per batch, but the training set has 10"):
        MPerClassSampler(LABELS, batch_size=48, m=4)
    with pytest.raises(OptionError, match="larger than the samples of every class"):
        MPerClassSampler(LABELS, batch_size=26, m=13)


@pytest.mark.parametrize("m, batch", [(1, 4), (4, 12), (2, 8)])
def test_no_class_comes_twice_in_a_batch(m, batch):
    """Where a batch takes the end of one shuffled cycle of classes and the start of the next, a
    class could come twice (one_per_class: 4 of 50 batches here; m_per_class 2m samples of one
    class, which smooth_ap refuses mid-run); every batch holds batch / m distinct classes, m each."""
    labels = np.repeat(np.arange(10), 20)
    sampler = OnePerClassSampler(labels, batch_size=batch, seed=0) if m == 1 else MPerClassSampler(labels, batch, m)
    for epoch in range(5):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == 200 // batch
        for b in batches:
            assert sorted(np.unique(labels[b], return_counts=True)[1]) == [m] * (batch // m)
