"""The networks of V-JEPA 2-AC (docs/release.md) and the reading of the release's weight files.

Leaf modules: nothing here imports `pipeline` or another stage, so the models can be lifted into
any other codebase (a planner on a robot, the release's own notebook) as they are.
"""
