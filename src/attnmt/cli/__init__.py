"""Command-line entry points: thin ``@hydra.main`` wrappers around the library.

Only this package sees a ``DictConfig``: each command converts it into the dataclasses of
:mod:`attnmt.config` and passes those down. The config tree is :func:`attnmt.config.config_dir`.
"""
