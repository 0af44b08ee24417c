"""MLflow "models from code" definition of a tierpick pyfunc model.

MLflow loads this file by path (it is never imported by tierpick itself), which is why it calls
``set_model`` at module level: that is MLflow's contract for code-defined models.
"""
# mypy: disable-error-code="no-untyped-def,misc"

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class TierpickModel(PythonModel):
    """A list of prompts in; a DataFrame of ``p_<tier>`` and the routed ``tier`` out."""

    def load_context(self, context):
        from tierpick import classifier

        self.clf = classifier.load(context.artifacts["model"])

    # the list[str] hint gives the model its MLflow signature: a list of prompts
    def predict(self, context, model_input: list[str], params=None):
        import pandas as pd

        prompts = [str(p) for p in model_input]
        proba = self.clf.predict_proba(prompts)
        frame = pd.DataFrame(proba, columns=[f"p_{t}" for t in self.clf.tiers])
        frame["tier"] = [self.clf.tiers[int(c)] for c in self.clf.router().choose(proba)[0]]
        return frame


mlflow.models.set_model(TierpickModel())
