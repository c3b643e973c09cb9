"""Paste a function alone into an empty file, as a reader who copies it into another project would.

`paste_alone(module, name)` takes the source of `module.name` (decorators included), adds the
sources of the functions its docstring names on a "needs:" line (and, transitively, theirs), and
executes them in a fresh namespace that holds only these imports:

    import math
    import numpy as np
    import scipy
    import torch
    import torch.nn.functional as F
    from scipy.optimize import linear_sum_assignment

It returns the pasted function. A module constant in a default value fails at definition, a module
constant, an unnamed helper or a missing import in the body fails at the call: the test then calls it
on a small input and compares with the module's own function.

A "needs:" line lists other functions, comma-separated, as `name` (same module) or `module.name`; a
line that ends with a comma continues on the next.
"""
import importlib
import inspect
import re
import textwrap

PREAMBLE = """\
import math
import numpy as np
import scipy
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
"""

NEEDS = re.compile(r"^\s*needs:\s*(.+?)\s*$", re.MULTILINE)


def needed(function):
    """(module name, function name) pairs named on the function's "needs:" line (a line that ends
    with a comma continues on the next)."""
    doc = inspect.getdoc(function) or ""
    match = NEEDS.search(doc)
    if not match:
        return []
    text, rest = match.group(1), doc[match.end():].splitlines()[1:]
    while text.endswith(",") and rest:
        text += " " + rest.pop(0).strip()
    pairs = []
    for item in text.split(","):
        item = item.strip().rstrip(".")
        if not item:
            continue
        module, _, name = item.rpartition(".")
        pairs.append((module or function.__module__, name))
    return pairs


def bundle(module_name, name):
    """Sources of the function and everything it needs, each once, the function itself last."""
    seen, order = set(), []

    def visit(module_name, name):
        if (module_name, name) in seen:
            return
        seen.add((module_name, name))
        function = getattr(importlib.import_module(module_name), name)
        for pair in needed(function):
            visit(*pair)
        order.append(textwrap.dedent(inspect.getsource(function)))

    visit(module_name, name)
    return order


def paste_alone(module_name, name):
    """The function `module_name.name` defined from its pasted source alone (see the module docstring)."""
    namespace = {"__name__": "pasted"}
    source = PREAMBLE + "\n\n".join(bundle(module_name, name))
    exec(compile(source, f"<pasted {module_name}.{name}>", "exec"), namespace)
    return namespace[name]
