"""The training data's reference for drift: what the served model compares live prompts with.

``reference.npz`` in a model directory (listed in its manifest, checksummed as every file):
the training prompts' embeddings (the graph's ``embedding`` output) seen two ways, as they are
and standardized by their mean and spread, each with k-means centroids and the distribution of
the training prompts' similarity to their nearest centroid
(:class:`~tierpick.classifier.runtime.Reference`). A live prompt's familiarity is how ordinary
its similarity would be among the training prompts' (the smaller of the two views): traffic
unlike the training data sits at the bottom.

``make model`` attaches it at export; ``python -m tierpick.training.reference MODEL_DIR
--dataset DIR`` attaches it to a model already exported; ``--study`` measures, per
leave-one-family-out fold, whether a family the fold never saw stands out.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tierpick import classifier
from tierpick.classifier.artifact import REFERENCE_FILE, read_manifest, sha256_file, write_manifest
from tierpick.classifier.runtime import Reference

CENTROIDS = 256


EXEMPLARS_PER_CENTROID = 4
EXEMPLAR_CHARS = 300


def build(
    model_dir: Path,
    prompts: Sequence[str],
    seed: int = 0,
    targets: npt.NDArray[np.float64] | None = None,
    mask: npt.NDArray[np.float64] | None = None,
) -> dict[str, npt.NDArray[Any]]:
    """The reference of ``prompts`` (the training split) as the model in ``model_dir`` embeds
    them (``reference.npz``'s arrays). With their ``targets`` and ``mask``, also exemplars:
    the training prompts nearest each centroid (up to 4), cut to 300 characters, with the
    observed success of each tier (NaN where none was observed), which ``tierpick classify
    --explain`` shows as the nearest training prompts."""
    from sklearn.cluster import MiniBatchKMeans

    emb = classifier.load(str(model_dir)).embed(list(prompts)).astype(np.float32)
    mean, std = emb.mean(axis=0), emb.std(axis=0) + 1e-6
    out: dict[str, npt.NDArray[Any]] = {"mean": mean, "std": std}
    probe = Reference((emb[:1], emb[:1]), (Reference.GRID, Reference.GRID), mean, std)
    views = probe.views(emb)
    for name, view in zip(("raw", "std"), views, strict=True):
        km = MiniBatchKMeans(
            n_clusters=min(CENTROIDS, len(prompts)), random_state=seed, n_init=3, batch_size=2048
        ).fit(view)
        c = km.cluster_centers_ / np.maximum(
            np.linalg.norm(km.cluster_centers_, axis=1, keepdims=True), 1e-12
        )
        out[f"centroids_{name}"] = c
        out[f"grid_{name}"] = np.quantile((view @ c.T).max(axis=1), Reference.GRID)
    out = {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}
    if targets is not None and mask is not None:
        near = views[0] @ out["centroids_raw"].T  # (prompts, centroids)
        picked = np.unique(np.argsort(-near, axis=0)[:EXEMPLARS_PER_CENTROID].ravel())
        observed = np.where(mask[picked] > 0, targets[picked], np.nan)
        out["exemplar_text"] = np.array([prompts[i][:EXEMPLAR_CHARS] for i in picked])
        out["exemplar_embedding"] = views[0][picked].astype(np.float16)
        out["exemplar_success"] = observed.astype(np.float32)
    return out


def attach(model_dir: Path, arrays: dict[str, npt.NDArray[Any]]) -> None:
    """Write ``reference.npz`` into the model directory and list it in the manifest."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    (model_dir / REFERENCE_FILE).write_bytes(buf.getvalue())
    manifest = read_manifest(model_dir, verify=False)  # its old reference is replaced
    files = {**manifest.files, REFERENCE_FILE: sha256_file(model_dir / REFERENCE_FILE)}
    write_manifest(model_dir, replace(manifest, files=files))


def study(loso_dir: Path, dataset: Path) -> str:
    """Does the reference see a family it was not trained on? For each leave-one-family-out
    fold: the fold's model, a reference from its own training prompts (the other families'
    train split), and the share of prompts with a familiarity under 0.05, for the held-out
    family and for the other families' test split (in distribution)."""
    from tierpick.classifier.table import format_table
    from tierpick.training.dataset import load_dataset

    ds = load_dataset(dataset)
    rows = list(
        zip(
            ds.table["prompt"].to_pylist(),
            ds.table["family"].to_pylist(),
            ds.table["split"].to_pylist(),
            strict=True,
        )
    )
    table = []
    for fold in sorted(p for p in loso_dir.iterdir() if p.is_dir()):
        family = fold.name
        train = [t for t, f, s in rows if f != family and s == "train"]
        test = [t for t, f, s in rows if f != family and s == "test"]
        held = [t for t, f, _ in rows if f == family]
        reference = Reference.from_arrays(build(fold, train), fold / "<built>")
        clf = classifier.load(str(fold))
        under = [float((reference.familiarity(clf.embed(g)) < 0.05).mean()) for g in (test, held)]
        table.append([family, len(test), f"{under[0]:.1%}", len(held), f"{under[1]:.1%}"])
    head = ["held-out family", "others' test prompts", "unfamiliar", "its prompts", "unfamiliar"]
    return format_table(head, table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", help="the model to attach to; with --study, a loso-models dir")
    ap.add_argument("--dataset", required=True, help="a built dataset (its train split is used)")
    ap.add_argument("--study", action="store_true", help="measure the drift signal per fold")
    args = ap.parse_args(argv)
    if args.study:
        print(study(Path(args.model_dir), Path(args.dataset)))
        return 0
    from tierpick.training.dataset import load_dataset
    from tierpick.training.fit import split_arrays

    train = split_arrays(load_dataset(Path(args.dataset)), "train")
    arrays = build(Path(args.model_dir), train.prompts, 0, train.targets, train.mask)
    attach(Path(args.model_dir), arrays)
    print(f"{args.model_dir}: {REFERENCE_FILE} from {len(train.prompts)} training prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
