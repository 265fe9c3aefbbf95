"""Command-line entry points around the library, one module a command. translate, evaluate, export,
serve and average share one command line (:func:`attnmt.cli.common.config_command`): ``key=value``
overrides of ``configs/NAME.yaml`` composed without Hydra's start-up, a misspelt key refused in one
line ("did you mean"), Hydra itself for ``--help`` and its own flags. train runs under ``@hydra.main``
(config groups, ``experiment=``, multirun) after the same one-line check of its command line. import
reads its three ``key=value`` arguments itself (``from=`` is no name a schema field can have), with
the same line for a misspelt key.

Only this package sees a ``DictConfig``: each command converts it into the dataclasses of
:mod:`attnmt.config` and passes those down. The config tree is :func:`attnmt.config.config_dir`.
"""
