"""The loss wrappers against pytorch-metric-learning 2.9: ``cross_batch_memory`` equals PML's
``CrossBatchMemory`` step by step over a sequence of batches (values, gradients, the queue), and
``self_supervised`` equals PML's ``SelfSupervisedLoss``; both in float64."""

import json
import os
import sys

import pytest
import torch

import dmlkit
from dmlkit.errors import DmlkitError, OptionError
from dmlkit.testing import check_plugin
from dmlkit_plugins import wrappers
from dmlkit_plugins.wrappers import SelfSupervisedLoss

pml_losses = pytest.importorskip("pytorch_metric_learning.losses", reason="PML not installed")
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu  # noqa: E402

DIM, CLASSES = 6, 5
#: batch sizes of a sequence: the queue (40) fills part-way, wraps inside a batch, and wraps again
SIZES = (16, 12, 16, 8, 16, 12, 16, 4)

PML_LOSSES = {
    "contrastive": lambda: pml_losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5),
    "multi_similarity": lambda: pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
    "triplet": lambda: pml_losses.TripletMarginLoss(margin=0.2, distance=_squared_lp()),
}
#: dmlkit's options that make the loss PML's (triplet: PML's AvgNonZeroReducer)
LOSS_OPTIONS = {"triplet": {"reduction": "mean_nonzero"}}
PML_MINERS = {
    "": lambda: None,
    "multi_similarity": lambda: pml_miners.MultiSimilarityMiner(epsilon=0.1),
    "triplet_margin": lambda: pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"),
}
MINER_OPTIONS = {"": {}, "multi_similarity": {"epsilon": 0.1}, "triplet_margin": {"type_of_triplets": "semihard"}}


def batches(seed, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    for n in sizes:
        yield torch.randn(n, DIM, generator=g, dtype=torch.float64), torch.randint(0, CLASSES, (n,), generator=g)


def xbm(loss="contrastive", miner="", memory_size=40, **options):
    built = dmlkit.get_registry().build(
        "loss",
        "cross_batch_memory",
        context={"num_classes": CLASSES, "embedding_size": DIM},
        loss=loss,
        loss_options=options.pop("loss_options", LOSS_OPTIONS.get(loss, {})),
        miner=miner,
        miner_options=MINER_OPTIONS[miner],
        memory_size=memory_size,
        **options,
    )
    if built.miner is not None:  # mine in float64, as PML does (Miner.forward computes in float32)
        inner = built.miner
        inner.forward = lambda e, y, r=None, ry=None: inner.mine(e.detach(), y, r.detach(), ry)
    return built


def value_and_grad(loss_fn, emb, labels):
    x = emb.clone().requires_grad_(True)
    value = loss_fn(x, labels)
    value.backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    ("loss", "miner"),
    [("contrastive", ""), ("contrastive", "multi_similarity"), ("multi_similarity", ""),
     ("multi_similarity", "multi_similarity"), ("triplet", ""), ("triplet", "triplet_margin")],
)  # fmt: skip
def test_cross_batch_memory_equals_pml_over_a_sequence_of_batches(loss, miner, seed):
    """Triplets go to the triplet loss only: PML's pair losses count a pair once per triplet that holds
    it, dmlkit's contrastive and multi_similarity once (a difference of those losses, not of XBM)."""
    ours = xbm(loss, miner)
    theirs = pml_losses.CrossBatchMemory(PML_LOSSES[loss](), DIM, memory_size=40, miner=PML_MINERS[miner]())
    theirs.embedding_memory = theirs.embedding_memory.double()
    nonzero = 0
    for emb, labels in batches(seed):
        value, grad = value_and_grad(ours, emb, labels)
        expected, expected_grad = value_and_grad(theirs, emb, labels)
        assert float(value) == pytest.approx(float(expected), rel=1e-9, abs=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)
        nonzero += float(expected) > 0
        # the queue: the same entries in the same slots, the same write position
        assert int(ours.queue_idx) == theirs.queue_idx and bool(ours.filled) == theirs.has_been_filled
        torch.testing.assert_close(ours.embedding_memory, theirs.embedding_memory, rtol=0, atol=0)
        assert torch.equal(ours.label_memory, theirs.label_memory)
    assert theirs.has_been_filled and nonzero >= len(SIZES) - 1  # the sequence wrapped and had work to do


@pytest.mark.parametrize("miner", ["", "multi_similarity"])
def test_cross_batch_memory_with_an_enqueue_mask_equals_pml(miner):
    """MoCo-style: the rows the mask marks (a key encoder's) are only enqueued, the others are anchors."""
    ours = xbm("contrastive", miner)
    theirs = pml_losses.CrossBatchMemory(PML_LOSSES["contrastive"](), DIM, memory_size=40, miner=PML_MINERS[miner]())
    theirs.embedding_memory = theirs.embedding_memory.double()
    g = torch.Generator().manual_seed(11)
    for emb, labels in batches(10):
        mask = torch.rand(len(emb), generator=g) < 0.5
        x, y = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
        value, expected = ours(x, labels, enqueue_mask=mask), theirs(y, labels, enqueue_mask=mask)
        (value + expected).backward()
        assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-9, abs=1e-12)
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-12)
        assert int(ours.queue_idx) == theirs.queue_idx
        torch.testing.assert_close(ours.embedding_memory, theirs.embedding_memory, rtol=0, atol=0)
    with pytest.raises(OptionError, match="one entry per row"):
        ours(emb, labels, enqueue_mask=mask[:-1])


def test_cross_batch_memory_never_pairs_an_item_with_its_own_queued_copy():
    """Every (anchor, memory entry) pair except the anchor's own copy: after a first batch the memory
    is that batch, so XBM equals the plain loss on the batch, which leaves out each item with itself."""
    emb, labels = next(batches(3))
    plain = dmlkit.get_registry().build("loss", "contrastive")
    assert float(xbm()(emb, labels)) == pytest.approx(float(plain(emb, labels)), rel=1e-12)


def test_the_memory_survives_a_checkpoint_round_trip(tmp_path):
    data = list(batches(4))
    straight = xbm("multi_similarity", "multi_similarity")
    expected = [float(straight(e, y)) for e, y in data]
    first = xbm("multi_similarity", "multi_similarity")
    for e, y in data[:5]:
        first(e, y)
    torch.save({"loss": first.state_dict()}, tmp_path / "ckpt.pt")
    assert {"embedding_memory", "label_memory", "queue_idx", "filled"} <= set(first.state_dict())
    resumed = xbm("multi_similarity", "multi_similarity").double()
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt")["loss"])
    assert int(resumed.queue_idx) == int(first.queue_idx) and bool(resumed.filled)
    assert [float(resumed(e, y)) for e, y in data[5:]] == pytest.approx(expected[5:], rel=1e-12)
    assert float(xbm("multi_similarity", "multi_similarity")(*data[5])) != pytest.approx(expected[5])  # needs the queue


def test_a_training_run_resumes_with_its_memory(cli, tmp_path):
    """`dmlkit train --resume` restores the queue from the checkpoint: the resumed run's second epoch
    logs the loss of an uninterrupted two-epoch run (a constant learning rate: a cosine schedule
    depends on the planned epochs)."""
    common = (
        "--loss",
        "xbm",
        "--loss-opt",
        "memory_size=256",
        "--sampler-opt",
        "batches_per_epoch=3",
        "--set",
        "scheduler=none",
    )
    code, _, err = cli("train", *common, "--epochs", "2", "--run-dir", str(tmp_path / "straight"))
    assert code == 0, err
    code, _, err = cli("train", *common, "--epochs", "1", "--run-dir", str(tmp_path / "cut"))
    assert code == 0, err
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)["loss"]
    assert int(state["queue_idx"]) > 0
    code, _, err = cli("train", "--epochs", "2", "--resume", str(tmp_path / "cut"))
    assert code == 0, err

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1]

    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "straight"), rel=1e-5)


def test_pml_cross_batch_memory_pairs_nca_with_its_own_copy_and_dmlkit_refuses_it():
    """PML lists NCALoss as supported, but its NCA ignores the pairs it is given, so each item's
    nearest neighbour is its own queued copy: PML's XBM value is NCA against the whole queue, copy
    included. dmlkit refuses nca (and any loss that ignores mined pairs) before any data loads."""
    emb, labels = next(batches(5))
    theirs = pml_losses.CrossBatchMemory(pml_losses.NCALoss(), DIM, memory_size=40)
    theirs.embedding_memory = theirs.embedding_memory.double()
    a1, p, a2, n = lmu.get_all_pairs_indices(labels, labels)
    pairs = (a1[a1 != p], p[a1 != p], a2, n)  # what PML's XBM gives the loss: the copy's pair removed
    # the first batch fills slots 0..n-1: PML's NCA against that queue, the copies in the softmax
    with_copy = pml_losses.NCALoss()(emb, labels, pairs, ref_emb=emb.clone(), ref_labels=labels)
    without_copy = pml_losses.NCALoss()(emb, labels, pairs)  # the batch against itself, the diagonal masked
    assert float(theirs(emb, labels)) == pytest.approx(float(with_copy), rel=1e-9)
    assert float(with_copy) < 0.5 * float(without_copy)  # each item's nearest neighbour: its own copy
    with pytest.raises(OptionError, match="cross_batch_memory cannot wrap loss 'nca': it ignores the mined pairs"):
        xbm("nca")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"memory_size": 0}, "memory_size must be an integer >= 1"),
        ({"loss": "proxynca"}, "cannot wrap loss 'proxynca': it compares embeddings with its own proxies"),
        ({"loss": "arcface"}, "cannot wrap loss 'arcface'"),
        ({"loss": "vicreg"}, "cannot use loss 'vicreg': it fails"),
        ({"loss": "self_supervised"}, "cannot wrap the wrapper 'self_supervised'"),
        ({"loss": "nosuchloss"}, "unknown loss 'nosuchloss'"),
        ({"miner": "nosuchminer"}, "unknown miner 'nosuchminer'"),
        ({"loss_options": {"neg_margin": -1.0}}, "pos_margin < neg_margin"),
        (
            {"loss": "combined", "loss_options": {"terms": ["triplet"], "triplet": {"miner": "batch_hard"}}},
            "terms have their own miners",
        ),
    ],
)
def test_cross_batch_memory_refuses_what_it_cannot_do_before_any_data_loads(options, message):
    from dmlkit.config import resolve

    registry = dmlkit.get_registry()
    with pytest.raises(DmlkitError, match=message):
        resolve({"loss": {"name": "cross_batch_memory", **options}}, registry)


def test_cross_batch_memory_refuses_the_runs_miner_a_reference_set_and_an_oversized_batch(cli, tmp_path):
    code, _, err = cli("train", "--loss", "xbm", "--miner", "batch_hard", "--epochs", "1",
                       "--run-dir", str(tmp_path / "r"))  # fmt: skip
    assert code != 0 and "drop the run's miner 'batch_hard'" in err and "--loss-opt miner=batch_hard" in err
    code, _, err = cli("train", "--loss", "xbm", "--loss-opt", "memory_size=8", "--epochs", "1",
                       "--run-dir", str(tmp_path / "s"))  # fmt: skip
    assert code != 0 and "memory_size 8 is smaller than the global batch" in err
    emb, labels = next(batches(6))
    with pytest.raises(OptionError, match="does not fit its memory_size 8"):
        xbm(memory_size=8)(emb, labels)
    with pytest.raises(OptionError, match="cannot take pairs or triplets mined on the batch"):
        xbm()(emb, labels, indices=dmlkit.build("miner", "batch_hard")(emb, labels))
    with pytest.raises(OptionError, match="ccp cannot wrap loss 'cross_batch_memory'.*cannot be given one"):
        from dmlkit_plugins.ccp import CCPLoss

        with dmlkit.get_registry().active():
            CCPLoss.validate_options({"base": "cross_batch_memory"})


def test_cross_batch_memory_as_a_term_of_a_combination():
    """The paper's loss: the in-batch loss plus the memory loss, as --loss contrastive+cross_batch_memory."""
    reg = dmlkit.get_registry()
    combined = reg.build(
        "loss", "combined", context={"num_classes": CLASSES, "embedding_size": DIM},
        terms=["contrastive", "cross_batch_memory"], cross_batch_memory={"memory_size": 40},
    )  # fmt: skip
    memory = xbm()
    for emb, labels in batches(7, SIZES[:3]):
        expected = reg.build("loss", "contrastive")(emb, labels) + memory(emb, labels)
        assert float(combined(emb, labels)) == pytest.approx(float(expected), rel=1e-12)


def _ddp_worker(rank, world, init_file, seed, out):
    import torch.distributed as dist

    from dmlkit.distributed import gather_batch

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        memory = xbm("multi_similarity", memory_size=40)
        views = dmlkit.get_registry().build("loss", "self_supervised", context={"embedding_size": DIM})
        values, ss_values = [], []
        for step, (emb, labels) in enumerate(batches(seed, (8,) * 10)):
            if step % world != rank:
                continue  # each rank takes every world-th batch, as the samplers do
            pair = step // world  # the rank's batch of this step, with its partner's
            e, y = gather_batch(emb, labels)
            values.append(float(memory(e, y)))
            g = torch.Generator().manual_seed(pair * 10 + rank)
            v = torch.randn(4, DIM, generator=g, dtype=torch.float64)
            ids = torch.arange(4) + 4 * rank
            e, y = gather_batch(torch.cat([v, v + 0.1]), torch.cat([ids, ids]))
            ss_values.append(float(views(e, y)))
        torch.save({"values": values, "ss": ss_values, "memory": memory.embedding_memory}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32", reason="gloo file rendezvous")
def test_under_torchrun_every_rank_enqueues_the_global_batch_in_rank_order(tmp_path):
    """Two gloo processes, each with its own batches, gathered as the trainer gathers them: both ranks
    hold the same queue and compute the loss of one process given the global batches in rank order;
    self_supervised regroups the gathered [view1; view2] of each rank."""
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), 8, str(tmp_path / "out")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    single = xbm("multi_similarity", memory_size=40)
    data = list(batches(8, (8,) * 10))
    expected = [float(single(torch.cat([data[s][0], data[s + 1][0]]), torch.cat([data[s][1], data[s + 1][1]])))
                for s in range(0, 10, 2)]  # fmt: skip
    for got in ranks:
        assert got["values"] == pytest.approx(expected, rel=1e-9)
        torch.testing.assert_close(got["memory"], single.embedding_memory, rtol=0, atol=0)
    plain = SelfSupervisedLoss(DIM)
    for pair, got in enumerate(ranks[0]["ss"]):
        v = [torch.randn(4, DIM, generator=torch.Generator().manual_seed(pair * 10 + r), dtype=torch.float64)
             for r in range(2)]  # fmt: skip
        first = torch.cat(v)
        expected_ss = plain(torch.cat([first, first + 0.1]), torch.cat([torch.arange(8), torch.arange(8)]))
        assert got == pytest.approx(float(expected_ss), rel=1e-9) and ranks[1]["ss"][pair] == got


# ------------------------------------------------------------------------------------ self-supervised
PML_VIEW_LOSSES = {
    "ntxent": lambda: pml_losses.NTXentLoss(temperature=0.07),
    "contrastive": lambda: pml_losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5),
    "triplet": lambda: pml_losses.TripletMarginLoss(margin=0.2, distance=_squared_lp()),
}


def _squared_lp():
    from pytorch_metric_learning.distances import LpDistance

    return LpDistance(power=2)


def two_views(seed, n=12):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    return z, z + 0.3 * torch.randn(n, DIM, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("loss", ["ntxent", "contrastive", "triplet"])
def test_self_supervised_equals_pml(loss, symmetric, seed):
    z1, z2 = two_views(seed)
    ours = dmlkit.get_registry().build(
        "loss",
        "self_supervised",
        context={"embedding_size": DIM},
        loss=loss,
        symmetric=symmetric,
        loss_options=LOSS_OPTIONS.get(loss, {}),
    )
    theirs = pml_losses.SelfSupervisedLoss(PML_VIEW_LOSSES[loss](), symmetric=symmetric)
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    labels = torch.arange(len(z1)) % 4  # the data's class labels: ignored but for the pairing check
    value = ours(torch.cat([a, b]), torch.cat([labels, labels]))
    value.backward()
    c, d = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    expected = theirs(c, d)
    expected.backward()
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-9) and float(expected.detach()) > 0
    torch.testing.assert_close(a.grad, c.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b.grad, d.grad, rtol=1e-9, atol=1e-12)


def test_self_supervised_is_simclr_ntxent_written_out():
    """A loop over the 2n views: -log softmax of the other view among the 2n - 1 others."""
    z1, z2 = two_views(9, n=5)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    total = 0.0
    for i in range(10):
        j = (i + 5) % 10
        others = [k for k in range(10) if k != i]
        logits = torch.stack([z[i] @ z[k] for k in others]) / 0.07
        total += -(z[i] @ z[j] / 0.07 - torch.logsumexp(logits, 0))
    ours = SelfSupervisedLoss(DIM, "ntxent")(torch.cat([z1, z2]), torch.zeros(10, dtype=torch.long))
    assert float(ours) == pytest.approx(float(total / 10), rel=1e-9)


def test_self_supervised_refuses_a_batch_that_is_not_two_views():
    loss = SelfSupervisedLoss(DIM)
    z1, z2 = two_views(0, n=4)
    with pytest.raises(OptionError, match="needs a batch of two views .*got 7 rows"):
        loss(torch.cat([z1, z2])[:7], torch.zeros(7, dtype=torch.long))
    with pytest.raises(OptionError, match="halves have different labels"):
        loss(torch.cat([z1, z2]), torch.arange(8))
    with pytest.raises(OptionError, match="use it without a miner"):
        loss(torch.cat([z1, z2]), torch.zeros(8, dtype=torch.long), indices=(torch.tensor([0]),) * 3)
    with pytest.raises(OptionError, match="self_supervised cannot wrap loss 'proxy_anchor'"):
        dmlkit.build("loss", "self_supervised", embedding_size=DIM, loss="proxy_anchor")
    with pytest.raises(OptionError, match="cannot use loss 'fastap'"):
        dmlkit.build("loss", "self_supervised", embedding_size=DIM, loss="fastap", symmetric=False)


def test_wrappers_pass_check_plugin_and_pass_events_on():
    report = check_plugin(wrappers, name="copy_of_wrappers", with_builtins="losses,pair_losses")
    assert sorted(report.components["loss"]) == ["cross_batch_memory", "self_supervised"]
    memory = xbm()
    seen = []
    memory.loss.on_epoch_end = lambda run, record: seen.append(record)
    memory.on_epoch_end(None, record={"epoch": 1})
    assert seen == [{"epoch": 1}]


def test_a_wrapped_loss_keeps_its_parameters_learning_rate():
    """margin's learnable beta trains inside XBM at its own multiplier, under the wrapper's parameter name."""
    memory = xbm("margin", loss_options={"learn_beta": True, "beta_lr_multiplier": 7.0})
    assert "loss.beta" in dict(memory.named_parameters()) and memory.lr_multipliers == {"loss.beta": 7.0}


def test_the_catalogue_lists_both_wrappers(cli):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "docs"))
    import gen

    text = gen.expand("<!-- dmlkit:components loss -->")
    assert "## `cross_batch_memory`" in text and "## `self_supervised`" in text
    assert "| `memory_size` | `1024` |" in text
    code, out, _ = cli("list", "loss")
    assert code == 0 and "cross_batch_memory" in out and "self_supervised" in out
