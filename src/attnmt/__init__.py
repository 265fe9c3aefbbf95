"""attnmt: a fast, correct, readable Transformer machine-translation trainer."""

from pathlib import Path

__version__ = "0.1.0"


def install_hint(extra: str) -> str:
    """The command that installs one of attnmt's extras (``ct2``, ``hf``, ``serve``, ``plot``), for the
    one-line errors of a missing package. attnmt is installed from its source (it is on no package
    index), so the command names the checkout this attnmt runs from where it can tell."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file():
        return f"pip install -e '{checkout}[{extra}]'"
    return f"pip install -e '.[{extra}]' in attnmt's source folder"
