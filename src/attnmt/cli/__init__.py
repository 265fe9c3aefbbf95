"""Command-line entry points around the library, one module a command: ``@hydra.main`` (train,
evaluate, export), a fast composition with Hydra for what it alone handles (translate, serve:
:func:`attnmt.cli.common.compose_cli`), argparse (average) and ``key=value`` arguments (import).

Only this package sees a ``DictConfig``: each command converts it into the dataclasses of
:mod:`attnmt.config` and passes those down. The config tree is :func:`attnmt.config.config_dir`.
"""
