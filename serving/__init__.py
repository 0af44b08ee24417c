"""tierpick serving: three jobs over the runtime, and the lifecycle they share.

- :mod:`tierpick.serving.lifecycle`: the model holder (verified load, hot reload, a bad artifact
  refused while the good one keeps serving), the ``grpc.aio`` server's start, health, signals
  and drain; shared by the two servers below.
- :mod:`tierpick.serving.service`: the ``TierRouter`` gRPC service (``tierpick serve``), with
  :mod:`tierpick.serving.client` its Python client.
- :mod:`tierpick.serving.scoring`: batch scoring of prompt logs (``tierpick score``), with
  :mod:`tierpick.serving.report` the spend report over its output.
- :mod:`tierpick.serving.gateway`: the Envoy external processor (``tierpick gateway``).

:mod:`tierpick.serving.cli` sits on top; :mod:`tierpick.serving.harness` (benchmarks, real Envoy and
LiteLLM processes) is for a checkout and not in the wheel. The jobs never import
each other (``tests/test_boundaries.py``); the package imports ``classifier``, never
``training``.
"""
