"""Scripts run as `python benchmarks/x.py` put their own folder first on sys.path, so a module
there named like a package that a library probes for (transformers looks for `kernels`,
`accelerate`, ...) shadows it: a `benchmarks/kernels.py` once broke every Hugging Face import
in the benchmarks. Guard the script folders against such names."""
import glob
import importlib.metadata
import inspect
import os
import re

from helpers import ROOT

SCRIPT_DIRS = ("benchmarks", "data_tools", "tests", ".")


def _script_modules():
    return {os.path.splitext(os.path.basename(p))[0]: p
            for d in SCRIPT_DIRS for p in glob.glob(os.path.join(ROOT, d, "*.py"))}


def _probed_by_transformers():
    import transformers.utils.import_utils as iu
    src = inspect.getsource(iu)
    found = set(re.findall(r'_is_package_available\(\s*"([\w.]+)"', src))
    found |= set(re.findall(r'find_spec\(\s*"([\w.]+)"', src))
    assert len(found) > 20, "the probe list could not be read from transformers"
    return {n.split(".")[0] for n in found}


def test_no_script_module_shadows_a_probed_or_installed_package():
    mine = _script_modules()
    taken = _probed_by_transformers() | set(importlib.metadata.packages_distributions())
    taken -= {"framework", "conftest", "helpers"}  # ours
    clash = sorted(f"{os.path.relpath(mine[n], ROOT)} shadows '{n}'" for n in mine.keys() & taken)
    assert not clash, clash
