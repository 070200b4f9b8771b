"""Verification, classification and ranking metrics (dmlkit.decisions) against scikit-learn and
brute-force loops over every pair and query, with and without query/gallery masks."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid

from dmlkit.decisions import (
    CALIBRATED_FMRS,
    bootstrap_ci,
    decision_metrics,
    ranking_metrics,
    roc_from_distances,
    verification_metrics,
)
from dmlkit.errors import DmlkitError


def data(n=160, d=6, classes=12, seed=0, integer=False):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, d))
    x = centres[labels] + 0.9 * rng.normal(size=(n, d))
    if integer:  # small integers: many exactly tied distances
        x = np.round(x * 1.5)
    return x, labels


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def masks(n, seed=1):
    rng = np.random.default_rng(seed)
    q = rng.random(n) < 0.5
    g = rng.random(n) < 0.7  # overlapping: some items query and are in the gallery
    return q, g


def all_pairs(x, labels, q=None, g=None):
    """Distance and same-class flag of every pair: i < j without masks, else every (query,
    gallery item) of two different items; written as plain loops."""
    n = len(x)
    pairs = []
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if q is None and j <= i:
                continue
            if q is not None and not (q[i] and g[j]):
                continue
            pairs.append((np.sqrt(((x[i] - x[j]) ** 2).sum()), labels[i] == labels[j]))
    d, same = (np.array(v) for v in zip(*pairs))
    return d, same


def sklearn_verification(d, same, fmrs=(1e-2, 1e-3, 1e-4)):
    fpr, tpr, _ = roc_curve(same, -d, drop_intermediate=False)
    fnr = 1 - tpr
    i = int(np.flatnonzero(fnr <= fpr)[0])  # the first ROC point past the crossing
    a, b = fnr[i - 1] - fpr[i - 1], fnr[i] - fpr[i]
    eer = fpr[i - 1] + a / (a - b) * (fpr[i] - fpr[i - 1])
    out = {"roc_auc": roc_auc_score(same, -d), "eer": eer}
    for t, key in zip(fmrs, ("fnmr_at_fmr_1e-2", "fnmr_at_fmr_1e-3", "fnmr_at_fmr_1e-4")):
        out[key] = 1 - tpr[fpr <= t].max()
    return out


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("integer", [False, True])
def test_verification_metrics_equal_sklearns_roc(masked, integer):
    x, labels = data(integer=integer)
    q, g = masks(len(x)) if masked else (None, None)
    normalise = not integer  # integer embeddings, unnormalised: exactly tied distances
    d, same = all_pairs(unit(x) if normalise else x, labels, q, g)
    want = sklearn_verification(d, same)
    got = verification_metrics(x, labels, q, g, normalise=normalise, memory_mb=0.05)  # many small blocks
    assert got["verification_pairs"] == "exact"
    assert got["genuine_pairs"] == int(same.sum()) and got["impostor_pairs"] == int((~same).sum())
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    if integer:
        assert len(np.unique(d)) < len(d) / 10  # the ties were there to be handled


def test_roc_from_distances_on_hand_made_ties():
    """Genuine [1, 2, 2, 5], impostor [2, 3, 4, 4, 6]: AUC by counting pairs by hand."""
    gen, imp = np.array([1.0, 2, 2, 5]), np.array([2.0, 3, 4, 4, 6])
    wins = 5 + (4 + 0.5) * 2 + 1  # 1 beats all; each 2 beats 4 and ties 1; 5 beats 6
    got = roc_from_distances(gen, imp, fmrs=(0.2, 0.4))
    assert got["roc_auc"] == pytest.approx(wins / 20)
    # FMR <= 0.2: at most 1 impostor accepted; a threshold that accepts the impostor 2 also accepts
    # both genuine 2s (FNMR 1/4); FMR <= 0.4 allows 2 (2 and 3): FNMR still 1/4
    assert got["fnmr_at_fmr_2e-1"] == pytest.approx(0.25) and got["fnmr_at_fmr_4e-1"] == pytest.approx(0.25)


def test_sampled_verification_says_so_and_stays_close():
    x, labels = data(n=400, classes=8, seed=3)
    exact = verification_metrics(x, labels)
    sampled = verification_metrics(x, labels, max_pairs=4000, seed=7)
    assert exact["verification_pairs"] == "exact" and sampled["verification_pairs"] == "sampled"
    assert sampled["genuine_pairs"] == exact["genuine_pairs"] and sampled["impostor_pairs"] == exact["impostor_pairs"]
    # impostors: 4,000 draws less those on genuine pairs; genuine: each kept with probability 4,000 / count
    assert sampled["impostor_pairs_used"] <= 4000 and abs(sampled["genuine_pairs_used"] - 4000) < 4 * np.sqrt(4000)
    # AUC of 4,000 x 4,000 sampled pairs: standard error below 0.005 for any AUC; 6 of them
    assert abs(sampled["roc_auc"] - exact["roc_auc"]) < 0.03
    assert abs(sampled["eer"] - exact["eer"]) < 0.03
    again = verification_metrics(x, labels, max_pairs=4000, seed=7)
    assert again == sampled  # seeded


def brute_ranking(x, labels, q, g, knn, ks):
    """Every metric per query, by sorting each query's gallery in a loop."""
    n = len(x)
    q = np.ones(n, bool) if q is None else q
    g = np.ones(n, bool) if g is None else g
    out = {}
    for i in np.flatnonzero(q):
        cand = [j for j in np.flatnonzero(g) if j != i]
        dist = np.array([np.sqrt(((x[i] - x[j]) ** 2).sum()) for j in cand])
        order = np.argsort(dist, kind="stable")
        ranked = np.array(cand)[order]
        rel = labels[ranked] == labels[i]
        r = rel.sum()
        if r == 0:
            continue
        row = {"mrr": 1 / (1 + np.argmax(rel))}
        for k in knn:
            top = list(labels[ranked[:k]])
            votes = {c: top.count(c) for c in top}
            best = max(votes.values())
            guess = next(c for c in top if votes[c] == best)  # the tied class seen first
            row[f"knn_accuracy_at_{k}"] = float(guess == labels[i])
        for k in ks:
            row[f"precision_at_{k}"] = rel[:k].sum() / k
            row[f"map_at_{k}"] = sum(rel[:m].sum() / m for m in range(1, k + 1) if rel[m - 1]) / min(k, r)
        centroids = {}
        for c in set(labels[cand]):
            members = [j for j in cand if labels[j] == c]
            centroids[c] = x[members].mean(0)
        nearest = min(centroids, key=lambda c: ((x[i] - centroids[c]) ** 2).sum())
        row["nearest_centroid_accuracy"] = float(nearest == labels[i])
        for key, v in row.items():
            out.setdefault(key, []).append(v)
    return {k: float(np.mean(v)) for k, v in out.items()}


@pytest.mark.parametrize("masked", [False, True])
def test_ranking_metrics_equal_a_loop_over_queries(masked):
    x, labels = data(n=120, classes=10, seed=5)
    q, g = masks(len(x), seed=2) if masked else (None, None)
    knn, ks = (1, 2, 4, 5), (1, 3, 10)
    want = brute_ranking(unit(x), labels, q, g, knn, ks)
    got = ranking_metrics(x, labels, q, g, knn=knn, ks=ks, memory_mb=0.02)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    both = decision_metrics(x, labels, q, g, knn=knn, ks=ks, centroid=True)
    assert {k: both[k] for k in want} == pytest.approx(want, abs=1e-12)
    assert both["roc_auc"] == pytest.approx(verification_metrics(x, labels, q, g)["roc_auc"], abs=1e-15)


def test_knn_and_centroid_equal_sklearn_where_sklearn_applies():
    """sklearn breaks a vote tie by the smallest label, dmlkit by the nearest: untied queries agree."""
    x, labels = data(n=300, classes=6, seed=9)
    z = unit(x)
    q = np.arange(len(x)) % 3 == 0
    g = ~q  # disjoint: sklearn fits the gallery and predicts the queries
    got = ranking_metrics(x, labels, q, g, knn=(1, 3, 7), ks=(), per_query=True)
    assert got["queries_without_match"] == 0
    for k in (1, 3, 7):
        clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute").fit(z[g], labels[g])
        pred = clf.predict(z[q])
        neighbours = labels[g][clf.kneighbors(z[q], return_distance=False)]
        counts = np.array([np.sort(np.bincount(row))[::-1] for row in neighbours], dtype=object)
        untied = np.array([len(c) == 1 or c[0] > c[1] for c in counts])
        ours = got["per_query"][f"knn_accuracy_at_{k}"]
        assert np.array_equal(ours[untied], (pred == labels[q])[untied].astype(float))
    centroid = NearestCentroid().fit(z[g], labels[g]).predict(z[q])
    assert got["nearest_centroid_accuracy"] == pytest.approx(float((centroid == labels[q]).mean()), abs=1e-12)
    # the macro averages: each class's accuracy over its queries, then the mean over classes
    for k in (1, 3, 7):
        hits = got["per_query"][f"knn_accuracy_at_{k}"]  # per query, in the order of the queries
        per_class = [hits[labels[q] == c].mean() for c in np.unique(labels[q])]
        assert got[f"knn_accuracy_at_{k}_macro"] == pytest.approx(float(np.mean(per_class)), abs=1e-12)
    per_class = [(centroid == labels[q])[labels[q] == c].mean() for c in np.unique(labels[q])]
    assert got["nearest_centroid_accuracy_macro"] == pytest.approx(float(np.mean(per_class)), abs=1e-12)
    # leave-one-out k-NN: sklearn's predict(None) leaves each point out of its own neighbours
    loo = ranking_metrics(x, labels, knn=(1,), ks=())
    clf = KNeighborsClassifier(n_neighbors=1, algorithm="brute").fit(z, labels)
    assert loo["knn_accuracy_at_1"] == pytest.approx(float((clf.predict(None) == labels).mean()), abs=1e-12)


def test_map_at_the_whole_gallery_is_sklearns_average_precision():
    x, labels = data(n=90, classes=7, seed=11)
    z = unit(x)
    got = ranking_metrics(x, labels, knn=(), ks=(89,), centroid=False)
    aps = []
    for i in range(len(x)):
        others = np.arange(len(x)) != i
        d = np.sqrt(((z[others] - z[i]) ** 2).sum(1))
        aps.append(average_precision_score(labels[others] == labels[i], -d))
    assert got["map_at_89"] == pytest.approx(float(np.mean(aps)), abs=1e-12)


def test_refusals():
    x, labels = data(n=40)
    with pytest.raises(DmlkitError, match="gallery items a query can reach"):
        ranking_metrics(x, labels, knn=(40,))
    with pytest.raises(DmlkitError, match="no genuine pair"):
        verification_metrics(x[:5], np.arange(5))
    with pytest.raises(DmlkitError, match="no impostor pair"):
        verification_metrics(x[:5], np.zeros(5, int))
    with pytest.raises(DmlkitError, match="max_pairs"):
        verification_metrics(x, labels, max_pairs=0)


def test_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    hits = (rng.random(2000) < 0.7).astype(float)
    ci = bootstrap_ci({"acc": hits}, resamples=2000, seed=1)["acc"]
    half = 1.959964 * hits.std() / np.sqrt(len(hits))
    assert ci[0] < hits.mean() < ci[1]
    assert (ci[1] - ci[0]) / 2 == pytest.approx(half, rel=0.1)
    assert bootstrap_ci({"acc": hits}, resamples=2000, seed=1)["acc"] == ci


def test_the_retrieval_evaluator_reports_what_it_declares():
    from dmlkit.selection import metric_direction
    from dmlkit_plugins.evaluators import RetrievalEvaluator

    x, labels = data(n=150, classes=8, seed=4)
    q, g = masks(len(x), seed=3)
    ev = RetrievalEvaluator(ks=(1, 4), verification=True, knn=(1, 3), ranking=True, ci=True, ci_resamples=200)
    out = ev(x, labels, q, g)
    assert set(ev.metrics) <= set(out)
    assert metric_direction(ev, "eer") == "min" and metric_direction(ev, "knn_accuracy_at_3") == "max"
    direct = decision_metrics(x, labels, q, g, knn=(1, 3), ks=(1, 4), centroid=True)
    for key in ("roc_auc", "eer", "fnmr_at_fmr_1e-3", "knn_accuracy_at_3", "mrr", "map_at_4", "precision_at_4"):
        assert out[key] == direct[key], key
    per_query = ranking_metrics(x, labels, q, g, knn=(3,), ks=(), per_query=True)["per_query"]
    assert out["ci"]["knn_accuracy_at_3"][0] < out["knn_accuracy_at_3"] < out["ci"]["knn_accuracy_at_3"][1]
    macro = {k for k in ev.metrics if k.endswith("_macro")}  # means over classes, not over queries: no interval
    assert macro == {"knn_accuracy_at_1_macro", "knn_accuracy_at_3_macro", "nearest_centroid_accuracy_macro"}
    assert set(out["ci"]) == set(ev.metrics) - macro - {
        "roc_auc",
        "eer",
        "fnmr_at_fmr_1e-2",
        "fnmr_at_fmr_1e-3",
        "fnmr_at_fmr_1e-4",
    }
    assert len(per_query["knn_accuracy_at_3"]) == out["queries"] - out["queries_without_match"]
    plain = RetrievalEvaluator(ks=(1,))
    assert set(plain(x, labels)) == {
        "precision_at_1",
        "r_precision",
        "map_at_r",
        "recall_at_1",
        "queries",
        "queries_without_match",
    }


def test_dmlkit_evaluate_verification_knn_and_ci(cli, tmp_path):
    import json

    x, labels = data(n=120, classes=6, seed=8)
    np.save(tmp_path / "e.npy", x)
    np.save(tmp_path / "l.npy", labels)
    args = ["evaluate", "--embeddings", str(tmp_path / "e.npy"), "--labels", str(tmp_path / "l.npy")]
    code, out, err = cli(*args, "--verification", "--knn", "1,5", "--ci", "--json")
    assert code == 0, err
    got = json.loads(out)
    want = decision_metrics(x, labels, knn=(1, 5), centroid=True)
    for key in ("roc_auc", "eer", "fnmr_at_fmr_1e-2", "knn_accuracy_at_5", "nearest_centroid_accuracy"):
        assert got[key] == want[key], key
    assert got["ci"]["knn_accuracy_at_5"][0] <= got["knn_accuracy_at_5"] <= got["ci"]["knn_accuracy_at_5"][1]
    code, out, err = cli(*args, "--ci")
    assert code == 0 and "95% interval" in out
    code, _, err = cli(*args, "--knn", "one")
    assert code != 0 and "--knn must be comma-separated integers" in err


# ------------------------------------------------------------------------------ operating point
@pytest.mark.parametrize("fmr", [1e-2, 1e-3])
def test_a_threshold_chosen_on_half_the_pairs_holds_its_fmr_on_the_other_half(fmr):
    """scikit-learn's digits (real 8x8 images, their 64 pixels as embeddings): the pairs are split at
    random into two halves; the threshold chosen on one gives the other an FMR inside the 99.9%
    binomial interval of the target (a random split of one population: the count is hypergeometric,
    narrower than binomial)."""
    from scipy.spatial.distance import pdist
    from scipy.stats import binom
    from sklearn.datasets import load_digits

    from dmlkit.decisions import operating_point_from_distances

    x, labels = load_digits(return_X_y=True)
    d = pdist(x.astype(np.float64))
    i, j = np.triu_indices(len(x), 1)  # pdist's order
    same = labels[i] == labels[j]
    half = np.random.default_rng(0).random(len(d)) < 0.5
    point = operating_point_from_distances(d[half & same], d[half & ~same], fmr=fmr)
    impostor = d[half & ~same]
    assert point["fmr"] == (impostor <= point["threshold"]).mean() <= fmr
    next_one = impostor[impostor > point["threshold"]].min()  # accepting it (and its ties) would pass the FMR
    assert (impostor <= next_one).mean() > fmr
    held_out = d[~half & ~same]
    accepted = int((held_out <= point["threshold"]).sum())
    low, high = binom.interval(0.999, len(held_out), fmr)
    assert low <= accepted <= high
    fnmr = float((d[~half & same] > point["threshold"]).mean())
    assert abs(fnmr - point["fnmr"]) < 0.02
    assert [r["fmr_target"] for r in point["thresholds"]] == sorted(
        {t for t in (*CALIBRATED_FMRS, fmr) if t * (half & ~same).sum() >= 1}, reverse=True
    )


def test_operating_point_of_embeddings_against_a_loop_over_pairs():
    from dmlkit.decisions import operating_point, rates_at

    x, labels = data(n=200, classes=5, seed=12)
    q, g = masks(len(x), seed=4)
    d, same = all_pairs(x, labels, q, g)  # not normalised: the space an index searches
    point = operating_point(x, labels, q, g, fmr=1e-2)
    accepted = d[~same] <= point["threshold"]
    assert point["fmr"] == pytest.approx(accepted.mean()) and accepted.mean() <= 1e-2
    assert (np.sort(d[~same])[accepted.sum()] - point["threshold"]) > 0  # the next impostor would be accepted
    assert (accepted.sum() + 1) / (~same).sum() > 1e-2  # ... and exceed the FMR
    assert point["fnmr"] == pytest.approx((d[same] > point["threshold"]).mean())
    rates = rates_at(x, labels, point["eer_threshold"], q, g)
    assert rates["fmr"] == pytest.approx((d[~same] <= point["eer_threshold"]).mean())
    assert abs(rates["fmr"] - point["eer"]) < 0.02 and abs(rates["fnmr"] - point["eer"]) < 0.02
    with pytest.raises(DmlkitError, match="cannot be calibrated"):
        operating_point(x[:30], labels[:30], fmr=1e-5)
