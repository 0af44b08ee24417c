"""tierpick: route each prompt to the cheapest LLM price tier likely to answer it.

The runtime (no torch)::

    import tierpick

    clf = tierpick.load()  # the shipped default model; or a directory, or models:/name@alias
    clf.predict_proba(["What is 2+2?"])  # calibrated success probability per tier
    clf.route(["What is 2+2?"])[0].tier  # the tier under the default policy

Subpackages: :mod:`tierpick.classifier` (the runtime, re-exported here), :mod:`tierpick.serving`
(the gRPC service, batch scoring, the Envoy gateway) and :mod:`tierpick.training` (ingest,
datasets, training, evaluation, MLflow; needs ``pip install 'tierpick[train]'``). The command
line is ``tierpick`` (:mod:`tierpick.cli`).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from tierpick import classifier as _runtime
from tierpick.classifier import *  # noqa: F403  (the runtime's public surface, as it declares it)

try:
    __version__ = version("tierpick")
except PackageNotFoundError:  # pragma: no cover - running from a checkout without install
    __version__ = "0+unknown"

__all__ = [*_runtime.__all__, "__version__"]
