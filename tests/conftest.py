"""Before any test module is imported: the packages of requirements.txt must be importable by the Python
that runs pytest, else one line says which Python lacks what, and how to install it (README)."""
import importlib.util
import sys

import pytest

REQUIRED = {"torch": "torch", "numpy": "numpy", "PIL": "pillow", "scipy": "scipy"}  # module -> package


def pytest_configure(config):
    missing = [package for module, package in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        pytest.exit(f"{', '.join(missing)} not installed for {sys.executable}, the Python that runs pytest: "
                    f"install the requirements first, pip install -r requirements.txt (README)",
                    returncode=4)
