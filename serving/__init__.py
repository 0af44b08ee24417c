"""tierpick serving: the gRPC service and batch scoring.

Imports ``classifier``, never ``training``.
"""
