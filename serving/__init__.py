"""The Ray Serve application of tinyqa (``build_app`` in :mod:`serving.app`) and its deployment
helpers (:mod:`serving.deploy`). Importing the package imports no Ray; :mod:`serving.api` (the
HTTP contract) needs none at all."""
