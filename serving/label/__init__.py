"""``tierpick label``: grade a sample of a team's own prompt log (or decision log) on every
tier's model, so ``tierpick adapt`` can learn from the team's own traffic and grader.

The modules, in the order data flows: :mod:`.config` (tiers' endpoints, judge, request
settings), :mod:`.sample` (the stratified sample), :mod:`.calls` (answers and grades, with
retries), :mod:`.run` (the resumable run and its outputs).
"""

from tierpick.serving.label.config import LabelConfig, load_label_config, parse_label_config
from tierpick.serving.label.run import LabelOptions, LabelResult, run_label

__all__ = [
    "LabelConfig",
    "LabelOptions",
    "LabelResult",
    "load_label_config",
    "parse_label_config",
    "run_label",
]
