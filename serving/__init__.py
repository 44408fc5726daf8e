"""The Ray Serve application of tinyqa: :mod:`serving.api` (the HTTP contract: no Ray, no torch),
:mod:`serving.ingress` (``QAIngress``: Ray, no torch), :mod:`serving.replica` (``QAModel``: torch),
:mod:`serving.app` (``build_app(args)``) and :mod:`serving.deploy` (``tinyqa serve``). Importing the
package imports nothing heavy; docs/architecture.md has the import rules."""
