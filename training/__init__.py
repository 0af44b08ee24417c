"""tierpick training: ingest eval outcomes, build datasets, train, evaluate and export models.

Heavy dependencies (torch, transformers, mlflow) are imported only by the modules that need them.
"""
