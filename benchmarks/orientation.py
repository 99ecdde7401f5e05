"""Measure (and refit) the auto up axis on labelled LPSB meshes: python benchmarks/orientation.py [--fit]

Per-object accuracy on every labelled mesh presented in all six axis conventions, from the shape alone
and with the file conventions' prior (what a lone `m3d render FILE` does); held-out accuracy of fits on
half the classes (the other half scored; --upright adds a dataset stated +y up, psb-train, to every fit,
half its classes in each split); the dataset's rule on LPSB as it is (mixed conventions) and made
consistent in each convention; how a mixed library's rule moves held-out files on strong evidence;
and the ModelNet samples alone in all six conventions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from m3d.meshio import load_mesh  # noqa: E402
from m3d.render import posed  # noqa: E402
from m3d.orientation import (  # noqa: E402
    AXIS_ROTATIONS, DIRECTIONS, EVIDENCE_WEIGHT, FEATURE_MEAN, FEATURE_STD, FEATURES, POSITIVE, STRONG, WEIGHTS, Rule,
    alone, convention_prior, decide_rule, features, log_softmax,
)


def to_convention(up: str, convention: str) -> np.ndarray:
    """The rotation that takes a mesh whose up is `up` into one whose up is `convention`."""
    return AXIS_ROTATIONS[convention].T @ AXIS_ROTATIONS[up]


def turned_rows(feats: np.ndarray, convention: str) -> np.ndarray:
    """(n, 6, k) features of +y-up meshes as if each were stored with its up along `convention`: the
    features are equivariant (tests/test_orientation.py checks it on real meshes), so the rows permute."""
    vec = {d: np.eye(3)["xyz".index(d[-1])] * (-1.0 if d.startswith("-") else 1.0) for d in DIRECTIONS}
    turn = AXIS_ROTATIONS[convention].T  # +y to +convention
    order = [next(j for j, e in enumerate(DIRECTIONS) if np.allclose(vec[e], turn.T @ vec[d])) for d in DIRECTIONS]
    return feats[:, order]


def fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Conditional logit: one weight per feature, shared by the six directions."""
    from scipy.optimize import minimize

    def nll(w):
        lp = log_softmax(x @ w)
        return -lp[np.arange(len(y)), y].mean() + l2 * (w @ w)

    return minimize(nll, np.zeros(x.shape[2])).x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "datasets" / "lpsb")
    ap.add_argument("--labels", type=Path, default=HERE / "lpsb_up_labels.txt")
    ap.add_argument("--upright", type=Path, default=HERE.parent.parent / "shared" / "datasets" / "psb-train",
                    help="a dataset stated +y up (the Princeton benchmark's convention), added to every fit; '' for none")
    ap.add_argument("--modelnet", type=Path, default=HERE.parent.parent / "shared" / "datasets" / "modelnet-samples",
                    help="ModelNet files (+z up), each measured alone in all six conventions")
    ap.add_argument("--fit", action="store_true", help="print refitted constants for m3d/orientation.py")
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--drop", default="", help="features to leave out of the fit (comma-separated)")
    ap.add_argument("--cache", type=Path, help="keep the measured features in this .npz between runs")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "orientation.json")
    args = ap.parse_args()
    rows = [line.split() for line in args.labels.read_text().splitlines() if line and not line.startswith("#")]
    start = time.perf_counter()
    meshes = {f"{c}/{i}": load_mesh(args.data / c / f"{i}.off") for c, i, _ in rows}
    truth = {f"{c}/{i}": up for c, i, up in rows}
    classes = np.array([k.split("/")[0] for k in meshes])
    # features of every mesh in every convention (equivariance is measured, not assumed)
    seconds = None
    if args.cache and args.cache.exists():
        raw = dict(np.load(args.cache))
    else:
        raw = {conv: np.stack([features(posed(m, to_convention(truth[k], conv))) for k, m in meshes.items()])
               for conv in DIRECTIONS}
        raw["as_is"] = np.stack([features(m) for m in meshes.values()])
        if args.cache:
            np.savez(args.cache, **raw)
        seconds = (time.perf_counter() - start) / (len(meshes) * (len(DIRECTIONS) + 1))
    as_is_raw = raw.pop("as_is")
    upright_paths = sorted(args.upright.glob("*/*.off")) if str(args.upright) not in ("", ".") else []
    if "upright" in raw and len(raw["upright"]) == len(upright_paths):
        upright_raw = raw.pop("upright")
    else:
        raw.pop("upright", None)
        upright_raw = np.stack([features(load_mesh(p)) for p in upright_paths]) if upright_paths else np.zeros((0, 6, len(FEATURES)))
        if args.cache:
            np.savez(args.cache, **raw, as_is=as_is_raw, upright=upright_raw)
    upright_classes = np.array([p.parent.name for p in upright_paths])
    if args.fit:
        allx = np.concatenate([*raw.values(), *(turned_rows(upright_raw, c) for c in DIRECTIONS)]).reshape(-1, len(FEATURES))
        mean, std = allx.mean(axis=0), allx.std(axis=0)
    else:
        mean, std = FEATURE_MEAN, FEATURE_STD
    keep = np.array([name not in args.drop.split(",") for name in FEATURES], dtype=float)
    x = {conv: (f - mean) / std * keep for conv, f in raw.items()}
    y = {conv: np.full(len(meshes), DIRECTIONS.index(conv)) for conv in DIRECTIONS}
    xu = {conv: (turned_rows(upright_raw, conv) - mean) / std * keep for conv in DIRECTIONS}
    yu = {conv: np.full(len(upright_raw), DIRECTIONS.index(conv)) for conv in DIRECTIONS}

    def fit_on(mask, upright_mask):
        """Fit on the labelled meshes of mask and the upright dataset's of upright_mask, all six conventions."""
        return fit(np.concatenate([x[c][mask] for c in DIRECTIONS] + [xu[c][upright_mask] for c in DIRECTIONS]),
                   np.concatenate([y[c][mask] for c in DIRECTIONS] + [yu[c][upright_mask] for c in DIRECTIONS]))

    everything = np.ones(len(meshes), bool), np.ones(len(upright_raw), bool)
    weights = fit_on(*everything) if args.fit else WEIGHTS

    def accuracy(w, mask=None):
        return float(np.mean([((x[c] @ w).argmax(1) == y[c])[mask if mask is not None else slice(None)].mean()
                              for c in DIRECTIONS]))

    lone = np.log(convention_prior())  # a single file of no known format: shape + the conventions

    def with_conventions(w, feats, mask=slice(None)):  # orientation.alone, for many rows at once
        return (lone + EVIDENCE_WEIGHT * log_softmax(feats[mask] @ w)).argmax(1)

    def by_rule(ev, truth_idx):
        """Accuracy of the dataset's rule (a sync of these objects as one dataset: all of them its sample)."""
        rule, _ = decide_rule(list(ev), "", len(ev))
        return float(np.mean([DIRECTIONS.index(rule.decide(e)[0]) == t for e, t in zip(ev, truth_idx)])), rule

    # held out: fit on half the classes (all six conventions), score the other half
    rng = np.random.default_rng(0)
    names = sorted(set(classes))
    held, held_dataset, held_alone = [], [], []
    strong = {"default_right_moved": 0, "default_wrong_mended": 0, "default_wrong_moved_elsewhere": 0,
              "right": 0, "wrong": 0}  # a mixed library's rule on held-out files, x/y/z conventions
    held_consistent: dict[str, list[float]] = {c: [] for c in DIRECTIONS}
    held_upright: list[float] = []  # the upright dataset's held-out classes, alone, +x/+y/+z
    upright_names = sorted(set(upright_classes))
    held_alone_conv: dict[str, list[float]] = {c: [] for c in DIRECTIONS}
    as_is_x = (as_is_raw - mean) / std * keep
    true_idx = np.array([DIRECTIONS.index(truth[k]) for k in meshes])
    for _ in range(args.splits):
        train = set(rng.permutation(names)[: len(names) // 2])
        m = np.array([c in train for c in classes])
        up_train = set(rng.permutation(upright_names)[: len(upright_names) // 2])
        um = np.array([c in up_train for c in upright_classes], dtype=bool)
        w = fit_on(m, um)
        if len(upright_raw) and (~um).any():
            held_upright.append(float(np.mean([with_conventions(w, xu[c], ~um) == DIRECTIONS.index(c) for c in POSITIVE])))
        held.append(accuracy(w, ~m))
        held_alone.append(float(np.mean(with_conventions(w, as_is_x, ~m) == true_idx[~m])))
        for conv in DIRECTIONS:
            held_alone_conv[conv].append(float(np.mean(with_conventions(w, x[conv], ~m) == y[conv][~m])))
        ev = log_softmax(as_is_x[~m] @ w)  # the held-out classes as one dataset, as they are
        held_dataset.append(by_rule(ev, true_idx[~m])[0])
        for conv in DIRECTIONS:  # the held-out classes made consistent in each convention
            ev = log_softmax(x[conv][~m] @ w)
            held_consistent[conv].append(by_rule(ev, y[conv][~m])[0])
        for true in POSITIVE:  # a file stored along `true` under a mixed rule whose convention is `conv`
            ev = log_softmax(x[true][~m] @ w)
            for conv in POSITIVE:
                rule = Rule(conv, False, tuple(convention_prior()), 0, 0)
                moved = np.array([rule.decide(e)[0] for e in ev])
                if true == conv:
                    strong["right"] += len(ev)
                    strong["default_right_moved"] += int((moved != conv).sum())
                else:
                    strong["wrong"] += len(ev)
                    strong["default_wrong_mended"] += int((moved == true).sum())
                    strong["default_wrong_moved_elsewhere"] += int(((moved != true) & (moved != conv)).sum())
    per_convention = {c: float(((x[c] @ weights).argmax(1) == y[c]).mean()) for c in DIRECTIONS}

    # the dataset step: LPSB as it is (mixed), and made consistent in each convention
    as_is = log_softmax(as_is_x @ weights)
    mixed, cons = by_rule(as_is, true_idx)
    consistent = {}
    for conv in DIRECTIONS:
        accuracy_c, rule = by_rule(log_softmax(x[conv] @ weights), y[conv])
        consistent[conv] = {"rule": rule.describe(), "accuracy": accuracy_c}
    result = {
        "meshes": len(meshes), "classes": names, "seconds_per_mesh": seconds,
        "object_accuracy_all_conventions": float(np.mean(list(per_convention.values()))),
        "object_accuracy_per_convention": per_convention,
        "object_accuracy_per_class": {n: accuracy(weights, classes == n) for n in names},
        "object_with_conventions": {
            "as_is": float(np.mean(with_conventions(weights, as_is_x) == true_idx)),
            "per_convention": {c: float(np.mean(with_conventions(weights, x[c]) == y[c])) for c in DIRECTIONS},
            "per_class_as_is": {n: float(np.mean((with_conventions(weights, as_is_x) == true_idx)[classes == n]))
                                for n in names}},
        "held_out_half_classes": {"mean": float(np.mean(held)), "min": float(np.min(held)),
                                  "max": float(np.max(held)), "splits": args.splits,
                                  "alone_with_conventions_as_is": float(np.mean(held_alone)),
                                  "upright_dataset": str(args.upright) if len(upright_raw) else None,
                                  "upright_dataset_alone_xyz": float(np.mean(held_upright)) if held_upright else None,
                                  "alone_with_conventions_per_convention": {
                                      c: float(np.mean(v)) for c, v in held_alone_conv.items()},
                                  "with_consensus_as_is": float(np.mean(held_dataset)),
                                  "mixed_rule_strong_evidence": {
                                      "strong_nats": STRONG,
                                      "in_the_convention_moved": strong["default_right_moved"] / strong["right"],
                                      "in_another_turned_upright": strong["default_wrong_mended"] / strong["wrong"],
                                      "in_another_turned_elsewhere": strong["default_wrong_moved_elsewhere"] / strong["wrong"]},
                                  "with_consensus_consistent": float(np.mean(list(held_consistent.values()))),
                                  "with_consensus_consistent_per_convention": {
                                      c: float(np.mean(v)) for c, v in held_consistent.items()}},
        "lpsb_as_is": {"rule": cons.describe(), "prior": dict(zip(DIRECTIONS, cons.prior)), "accuracy": mixed,
                       "object_only_accuracy": float(np.mean([DIRECTIONS[int(e.argmax())] == truth[k]
                                                              for e, k in zip(as_is, meshes)]))},
        "consistent_dataset": consistent,
    }
    modelnet = {}
    for path in sorted(args.modelnet.glob("*/*/*.off")):  # lone files, as `m3d render FILE` poses them
        mesh = load_mesh(path)
        picked = {conv: alone(log_softmax(((features(posed(mesh, to_convention("z", conv))) - mean) / std * keep)
                                          @ weights)) for conv in DIRECTIONS}
        modelnet[path.name] = {"picked": picked, "upright": sum(p == c for c, p in picked.items())}
    result["modelnet_alone"] = modelnet
    if args.fit:
        fmt = lambda a: "np.array([" + ", ".join(f"{v:.4g}" for v in a) + "])"  # noqa: E731
        result["fitted"] = {"FEATURE_MEAN": fmt(mean), "FEATURE_STD": fmt(std), "WEIGHTS": fmt(weights)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
