"""How to run Distillery on a cluster (see README.md here); ``cluster.local`` is importable for the tests."""
